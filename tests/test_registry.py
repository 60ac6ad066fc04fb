"""A technique is one module: registering one from this test file alone makes it a config option,
a settings section with validated keys, a default aux-loss weight and a trainable model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from condcomp import registry
from condcomp.config import ConfigError, ModelConfig, from_dict
from condcomp.layers import LayerInfo
from condcomp.models import Transformer
from condcomp.settings import Settings, setting
from condcomp.train import Trainer


@dataclass
class ToySettings(Settings):
    """A gated FFN: y = sigmoid(g . x) * W2 relu(W1 x)."""

    width: int = setting(16, ge=1, help="hidden size")
    l2: float = setting(0.0, ge=0.0, help="scale of the returned aux loss")


class ToyGatedFFN(nn.Module):
    aux_loss_names = ("toy_l2",)

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False)

    def forward(self, x, padding_mask=None):
        h = torch.relu(self.up(x))
        return torch.sigmoid(self.gate(x)) * self.down(h), LayerInfo(aux_losses={"toy_l2": h.pow(2).mean()})


@pytest.fixture
def toy_technique():
    @registry.register("ffn", "toy_gated", settings=ToySettings, section="toy", summary="a gated toy FFN",
                       aux_loss_weights={"toy_l2": 0.5})
    def build(*, model, settings, layer_idx):
        return ToyGatedFFN(model.d_model, settings.width)

    yield
    registry.unregister("ffn", "toy_gated")


def test_a_technique_registered_from_a_test_file_trains_through_a_config(toy_technique, tiny_config):
    cfg = tiny_config("toy", **{"model.ffn": "toy_gated", "model.toy.width": 24, "train.steps": 6,
                               "train.eval_every": 6, "train.checkpoint_every": 6})
    assert cfg.model.toy.width == 24 and cfg.train.aux_loss_weights["toy_l2"] == 0.5
    trainer = Trainer(cfg)
    assert isinstance(trainer.model.blocks[0].ffn, ToyGatedFFN)
    assert trainer.model.blocks[0].ffn.up.out_features == 24
    result = trainer.train()
    assert result.step == 6 and result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in open(f"{cfg.run_dir}/metrics.jsonl")]
    assert any("aux.toy_l2" in r for r in records)
    # The saved config names the section, and loads back while the technique is registered.
    saved = json.loads(open(f"{cfg.run_dir}/config.json").read())
    assert saved["model"]["toy"] == {"width": 24, "l2": 0.0}


def test_a_registered_section_is_validated_with_its_full_key_path(toy_technique):
    with pytest.raises(ConfigError, match=r"model\.toy\.width: must be >= 1, got 0"):
        from_dict(ModelConfig, {"ffn": "toy_gated", "toy": {"width": 0}}, prefix="model.")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.toy\.widht'; did you mean 'model\.toy\.width'"):
        from_dict(ModelConfig, {"toy": {"widht": 3}}, prefix="model.")
    with pytest.raises(ConfigError, match=r"model\.toy\.width: expected an integer"):
        from_dict(ModelConfig, {"toy": {"width": "wide"}}, prefix="model.")


def test_sections_pass_by_name_and_read_as_attributes(toy_technique):
    cfg = ModelConfig(d_model=32, n_heads=2, seq_len=8, n_layers=1, ffn="toy_gated", toy=ToySettings(width=5))
    assert cfg.toy.width == 5 and cfg.moe.num_experts == 8  # every registered section is present
    assert Transformer(cfg).blocks[0].ffn.up.out_features == 5
    assert from_dict(ModelConfig, cfg.to_dict()) == cfg


def test_unknown_and_duplicate_techniques_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"model\.ffn: 'mo' is not one of \[.*'moe'"):
        from_dict(ModelConfig, {"ffn": "mo"}, prefix="model.")
    with pytest.raises(registry.RegistryError, match="already registered"):
        registry.register("ffn", "moe")(lambda **kw: None)
    with pytest.raises(registry.RegistryError, match="available"):
        registry.get("block", "nope")


def test_the_trainer_asks_for_a_weight_for_every_aux_loss_before_training(toy_technique, tiny_config):
    from condcomp.train import TrainingError

    cfg = tiny_config("noweight", **{"model.ffn": "toy_gated", "train.aux_loss_weights": "{load_balance: 0.01}"})
    with pytest.raises(TrainingError, match="toy_l2"):
        Trainer(cfg)


def test_condcomp_techniques_lists_every_registered_technique_from_the_registry(toy_technique, capsys):
    from condcomp.cli import main

    assert main(["techniques", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    listed = {(i["kind"], i["name"]) for i in items}
    assert listed == {(t.kind, t.name) for t in registry.techniques()}
    toy = next(i for i in items if i["name"] == "toy_gated")
    assert toy["section"] == "toy" and toy["causal"] is True and toy["aux_loss_weights"] == {"toy_l2": 0.5}
    assert [s["name"] for s in toy["settings"]] == ["width", "l2"] and toy["settings"][0]["default"] == 16
    moe = next(i for i in items if i["name"] == "moe")
    assert any(s["name"] == "priority" and "encoders only" in s["notes"] for s in moe["settings"])
    assert main(["techniques"]) == 0
    text = capsys.readouterr().out
    assert "ffn: toy_gated" in text and "model.toy.*" in text and "width" in text
