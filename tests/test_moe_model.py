import pytest
import torch

from condcomp.config import ConfigError, ModelConfig, load_config
from condcomp.techniques.moe import MoESettings
from condcomp.models import Transformer
from condcomp.routing import ExpertChoiceRouter


def moe_model(**moe):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn="moe",
                      moe=MoESettings(num_experts=4, d_ff=16, **moe))
    return Transformer(cfg)


@pytest.mark.parametrize("moe", [
    dict(router="top_k", k=1, capacity_factor=1.0),
    dict(router="top_k", k=2, capacity_factor=None),
    dict(router="expert_choice", capacity_factor=2.0, expert_choice_mode="per_position"),
])
@pytest.mark.parametrize("training", [True, False])
def test_moe_decoder_never_reads_future_tokens(moe, training):
    model = moe_model(**moe).train(training)
    if not training:
        model.train()
        model(torch.randint(0, 256, (8, 16)))  # learn expert-choice thresholds
        model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (6, 16), generator=g)
    for t in (0, 5, 14):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, 256, (6, 15 - t), generator=g)
        with torch.no_grad():
            a, b = model(x).logits, model(y).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)


def test_global_expert_choice_reads_the_future_and_a_decoder_refuses_it():
    # The hazard is real: in global mode, changing a later token changes an earlier token's output.
    torch.manual_seed(0)
    from condcomp.layers.moe import MoE

    moe = MoE(d_model=8, d_ff=8, num_experts=2,
              router=ExpertChoiceRouter(d_model=8, num_experts=2, capacity_factor=1.0, mode="global"))
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0], moe.router.gate.weight[1, 0] = 1.0, -1.0
    x = torch.randn(1, 8, 8)
    x[0, 7, 0] = -10.0  # the last token avoids expert 0 ...
    y = x.clone()
    y[0, 7, 0] = 10.0  # ... until it changes and takes one of expert 0's four slots from an earlier token
    assert not torch.allclose(moe(x)[0][0, :7], moe(y)[0][0, :7])
    with pytest.raises(ConfigError, match="per_position"):
        load_config(None, ["model.ffn=moe", "model.moe.router=expert_choice", "model.moe.expert_choice_mode=global"])
    model = moe_model(router="expert_choice")
    model.blocks[0].ffn.router.mode = "global"
    with pytest.raises(ValueError, match="not causal"):
        model._refuse_look_ahead()


def test_moe_every_alternates_dense_and_moe_layers():
    from condcomp.layers import FeedForward
    from condcomp.layers.moe import MoE

    model = moe_model(moe_every=2)
    assert isinstance(model.blocks[0].ffn, FeedForward) and isinstance(model.blocks[1].ffn, MoE)


def test_model_returns_summed_aux_losses_and_per_layer_metrics():
    model = moe_model(router="top_k", k=2)
    out = model(torch.randint(0, 256, (2, 16)))
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    assert "layer0.ffn.tokens_per_expert" in out.metrics and "layer1.ffn.fraction_dropped" in out.metrics
    out.aux_losses["load_balance"].backward()
    assert model.blocks[0].ffn.router.gate.weight.grad.abs().sum() > 0


def test_moe_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.moe\.k"):
        load_config(None, ["model.ffn=moe", "model.moe.num_experts=2", "model.moe.k=3"])
    with pytest.raises(ConfigError, match=r"model\.moe\.capacity_factor"):
        load_config(None, ["model.moe.capacity_factor=0"])


@pytest.mark.parametrize("name", ["moe-top1", "moe-top2", "moe-ec"])
def test_example_configs_train_a_few_steps(name, text_file, tmp_path):
    from condcomp.train import Trainer

    from conftest import tiny_overrides

    sets = tiny_overrides(text_file, tmp_path / name, tmp_path / "cache", **{"train.steps": 3, "train.eval_every": 3})
    sets = [s for s in sets if not s.startswith(("model.", "train.precision"))]
    cfg = load_config(f"configs/{name}.yaml", sets + ["model.d_model=32", "model.n_heads=2", "model.seq_len=32",
                                                       "model.moe.d_ff=32"])
    result = Trainer(cfg).train()
    assert result.val_bpb is not None
    import json

    record = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()][0]
    assert "layer1.ffn.tokens_per_expert" in record and "aux.z_loss" in record
