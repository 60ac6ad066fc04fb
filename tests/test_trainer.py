import json
import math

import pytest
import torch

from condcomp.train import CheckpointError, Trainer, TrainingError, load_model
from condcomp.train.checkpoint import list_checkpoints, verify_checkpoint
from condcomp.train.trainer import lr_factor


def losses_of(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_stop_and_resume_gives_identical_losses(tiny_config):
    straight = Trainer(tiny_config("straight", **{"train.steps": 20})).train()

    Trainer(tiny_config("split", **{"train.steps": 20})).train(until=10)
    resumed = Trainer(tiny_config("split", **{"train.steps": 20}), resume=True)
    assert resumed.step == 10
    rest = resumed.train()

    assert straight.losses[10:] == rest.losses  # bit-for-bit, fp32
    assert losses_of(straight.run_dir) == losses_of(rest.run_dir)
    for a, b in zip(load_model(straight.checkpoint)[0].parameters(), load_model(rest.checkpoint)[0].parameters()):
        assert torch.equal(a, b)


def test_resume_drops_log_lines_written_after_the_checkpoint(tiny_config):
    t = Trainer(tiny_config("log", **{"train.steps": 13, "train.checkpoint_every": 10}))
    t.train()  # checkpoints at 10 and 13
    # Pretend the run died after step 13 was logged but only step 10 was checkpointed.
    import shutil

    shutil.rmtree(list_checkpoints(t.run_dir)[-1])
    resumed = Trainer(tiny_config("log", **{"train.steps": 13, "train.checkpoint_every": 10}), resume=True)
    assert resumed.step == 10
    steps = [json.loads(l)["step"] for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10


def test_training_reduces_loss_and_logs_flops(tiny_config):
    result = Trainer(tiny_config("learn", **{"train.steps": 40, "train.lr": 1e-2})).train()
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    step_flops = [r["step_flops"] for r in records if "step_flops" in r]
    # 6 * params * tokens is the textbook count for matmul-dominated training; attention adds a bit.
    model, cfg = load_model(result.run_dir)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    n_matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    lower = 6 * n_matmul_params * tokens
    assert lower < step_flops[-1] < 3 * lower
    assert result.total_flops == pytest.approx(sum(step_flops))
    assert any("val_bpb" in r for r in records)


def test_corrupted_checkpoint_fails_clearly_and_is_not_overwritten(tiny_config):
    t = Trainer(tiny_config("corrupt", **{"train.steps": 10}))
    t.train()
    path = list_checkpoints(t.run_dir)[-1]
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(CheckpointError, match="corrupted: model.safetensors"):
        Trainer(tiny_config("corrupt", **{"train.steps": 20}), resume=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_truncated_checkpoint_fails_clearly(tiny_config):
    t = Trainer(tiny_config("trunc", **{"train.steps": 10}))
    t.train()
    path = list_checkpoints(t.run_dir)[-1]
    state = path / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_existing_run_is_not_overwritten_without_resume(tiny_config):
    Trainer(tiny_config("exists", **{"train.steps": 10})).train()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(tiny_config("exists", **{"train.steps": 10}))


def test_resume_refuses_a_different_model(tiny_config):
    Trainer(tiny_config("other", **{"train.steps": 10})).train()
    with pytest.raises(TrainingError, match="different model config"):
        Trainer(tiny_config("other", **{"train.steps": 20, "model.d_model": 64}), resume=True)


def test_divergence_stops_with_intact_last_checkpoint(tiny_config):
    t = Trainer(tiny_config("nan", **{"train.steps": 20}))
    t.train(until=10)
    good = list_checkpoints(t.run_dir)[-1]
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    # Step 11 (the log numbers steps from 1) diverged; the message names the checkpoint that is on disk.
    with pytest.raises(TrainingError, match=f"loss became nan at step 11.*last checkpoint, {good}, is intact"):
        t.train()
    verify_checkpoint(good)
    assert list_checkpoints(t.run_dir)[-1] == good


def test_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(0.1)
    assert math.isclose(f[55], 0.1 + 0.9 * 0.5, rel_tol=1e-9)


def test_bf16_autocast_trains(tiny_config):
    result = Trainer(tiny_config("bf16", **{"train.steps": 10, "train.precision": "bf16"})).train()
    assert all(math.isfinite(l) for l in result.losses) and result.val_bpb < 8.5


def test_unweighted_aux_loss_is_an_error(tiny_config):
    t = Trainer(tiny_config("aux", **{"train.steps": 1}))
    with pytest.raises(TrainingError, match="aux_loss_weights.mystery"):
        t.aux_loss({"mystery": torch.tensor(1.0)})
