"""Fully sharded training (FSDP2), sharded checkpoints (torch.distributed.checkpoint), activation
checkpointing and the per-rank memory check, on real gloo process groups (2 and 4 ranks).

The reference twin of every sharded run is one process on the combined batch, as for DDP
(tests/test_distributed.py): the same losses and the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from condcomp.config import load_config
from condcomp.train.checkpoint import list_checkpoints, read_weights, verify_checkpoint

from conftest import tiny_overrides
from dist_workers import free_port, run_ranks
from test_distributed import assert_same_training

# Dropless top-2 without aux losses: each token's treatment depends on its own sequence only, so the
# sharded run must match one process exactly (up to float summation order).
MOE = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.capacity_factor": "null",
       "train.aux_loss_weights.load_balance": 0.0, "train.aux_loss_weights.z_loss": 0.0}
SINGLE_ONLY = ("train.expert_parallel", "train.fsdp", "train.activation_checkpointing")


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (FSDP shards gathered, expert shards gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from condcomp.distributed import full_experts

    with full_experts(trainer.model):
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in state.items()}


def train_worker(rank: int, world: int, overrides: list[str], until: int | None, resume: bool) -> dict:
    from condcomp.train import Trainer

    trainer = Trainer(load_config(None, overrides), resume=resume)
    result = trainer.train(until=until)
    return {"losses": result.losses, "state": full_weights(trainer), "step": result.step, "val_bpb": result.val_bpb,
            "memory": trainer.state_memory}


def train_single(overrides, until=None, resume=False) -> dict:
    from condcomp.train import Trainer

    trainer = Trainer(load_config(None, overrides), resume=resume)
    result = trainer.train(until=until)
    return {"losses": result.losses, "state": full_weights(trainer), "step": result.step, "val_bpb": result.val_bpb,
            "memory": trainer.state_memory}


def single_args(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith(SINGLE_ONLY)]


@pytest.mark.parametrize("variant, world, extra", [
    ("dense", 2, {}),
    # Experts over the 2 ranks of each expert group, everything else sharded over all 4; blocks
    # recomputed in backward.
    ("moe_ep2x2_recompute", 4, {**MOE, "train.expert_parallel": 2, "train.activation_checkpointing": True}),
])
def test_fsdp_training_equals_one_process_on_the_combined_batch(variant, world, extra, text_file, tmp_path):
    """10 steps, a sharded checkpoint at step 5, == 10 steps of one process (losses, weights, val)."""
    sets = {"train.steps": 10, "train.batch_size": 4, "train.checkpoint_every": 5, "train.fsdp": True, **extra}
    args = tiny_overrides(text_file, tmp_path / "fsdp", tmp_path / "cache", **sets)
    ranks = run_ranks(train_worker, world, tmp_path / "spawn", args, None, False)
    single = train_single(single_args(tiny_overrides(text_file, tmp_path / "single", tmp_path / "cache", **sets)))
    for r in ranks:
        assert r["losses"] == ranks[0]["losses"]
        assert_same_training(r, single, tol=2e-5)
        assert r["val_bpb"] == pytest.approx(single["val_bpb"], rel=1e-5)
    # Each rank holds 1/world of the non-expert training state (parameters, gradients, AdamW) and
    # 1/expert_parallel of the experts' (the largest rank's, as FSDP may split unevenly).
    from condcomp.distributed.fsdp import planned_state_memory
    from condcomp.models import Transformer

    with torch.device("meta"):
        meta = Transformer(load_config(None, args).model)
    planned = planned_state_memory(meta, world=world, expert_parallel=sets.get("train.expert_parallel", 1), fsdp=True)
    assert ranks[0]["memory"]["state_gib"] * 2**30 == pytest.approx(planned.total, rel=0.02)
    assert planned.total < 0.55 * single["memory"]["state_gib"] * 2**30
    saved = list_checkpoints(tmp_path / "fsdp")
    assert [p.name for p in saved] == ["step_00000005", "step_00000010"]
    manifest = verify_checkpoint(saved[-1])
    assert manifest["format"] == "sharded"
    assert sorted(n for n in manifest["files"] if n.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(world)]
    # The sharded checkpoint read back whole in this process is the trained model.
    weights = read_weights(saved[-1])
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_reshards_from_4_ranks_to_2_and_to_1(text_file, tmp_path):
    """A run on 4 ranks (FSDP + experts over 2) stopped at step 4 goes on with FSDP on 2 ranks to step 8,
    then in one process to 12: the curve and weights of an uninterrupted single-process run. The step-8
    checkpoint, consolidated to one safetensors file, is the single-process run's step-8 model."""
    from safetensors.torch import load_file

    from condcomp.cli import main

    sets = {"train.steps": 12, "train.batch_size": 4, "train.checkpoint_every": 4, "train.fsdp": True,
            "train.keep_checkpoints": 3, **MOE}
    args = tiny_overrides(text_file, tmp_path / "run", tmp_path / "cache", **sets)
    first = run_ranks(train_worker, 4, tmp_path / "spawn4", args + ["train.expert_parallel=2"], 4, False)
    second = run_ranks(train_worker, 2, tmp_path / "spawn2", args, 8, True)
    last = train_single(args, resume=True)
    reference = train_single(single_args(tiny_overrides(text_file, tmp_path / "reference", tmp_path / "cache",
                                                        **sets)))
    assert first[0]["step"] == 4 and second[0]["step"] == 8 and last["step"] == 12
    curve = first[0]["losses"] + second[0]["losses"] + last["losses"]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference["losses"]), rtol=2e-5, atol=2e-5)
    assert_same_training({"losses": [], "state": last["state"]}, {"losses": [], "state": reference["state"]}, 2e-5)

    out = tmp_path / "step8.safetensors"
    assert main(["consolidate", str(tmp_path / "run" / "checkpoints" / "step_00000008"), "--out", str(out)]) == 0
    consolidated = load_file(str(out))
    want = load_file(str(tmp_path / "reference" / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert consolidated.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(consolidated[name], value, rtol=2e-5, atol=2e-5, msg=name)


def test_a_whole_checkpoint_resumes_sharded(text_file, tmp_path):
    """A DDP run's whole checkpoint (weights and AdamW state) continues under FSDP unchanged."""
    sets = {"train.steps": 8, "train.batch_size": 4, "train.checkpoint_every": 4}
    args = tiny_overrides(text_file, tmp_path / "run", tmp_path / "cache", **sets)
    first = run_ranks(train_worker, 2, tmp_path / "spawn1", args, 4, False)
    second = run_ranks(train_worker, 2, tmp_path / "spawn2", args + ["train.fsdp=true"], None, True)
    reference = train_single(tiny_overrides(text_file, tmp_path / "reference", tmp_path / "cache", **sets))
    curve = first[0]["losses"] + second[0]["losses"]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference["losses"]), rtol=2e-5, atol=2e-5)
    assert_same_training({"losses": [], "state": second[1]["state"]}, {"losses": [], "state": reference["state"]},
                         2e-5)


# -- activation checkpointing -----------------------------------------------------------------------

@pytest.mark.parametrize("config", ["dense", "moe-ec", "mod", "colt5"])
def test_activation_checkpointing_changes_no_number(config, text_file, tmp_path):
    """Recomputing blocks in backward: the same losses, weights, buffers (expert choice's inference
    thresholds move once per step, not twice) and model FLOPs; the executed FLOPs are larger by the
    recomputed forward passes."""
    from pathlib import Path

    from condcomp.train import Trainer

    path = str(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml")
    sets = {"train.steps": 4, "train.batch_size": 4, "train.checkpoint_every": 4, "model.dropout": 0.1}

    def run(name, recompute):
        trainer = Trainer(load_config(path, tiny_overrides(text_file, tmp_path / name, tmp_path / "cache", **sets,
                                                           **{"train.activation_checkpointing": recompute})))
        losses = trainer.train().losses
        records = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return losses, trainer.model.state_dict(), [r for r in records if "loss" in r]

    plain, recomputed = run("plain", False), run("recomputed", True)
    assert plain[0] == recomputed[0]
    for name, value in plain[1].items():
        torch.testing.assert_close(recomputed[1][name], value, rtol=0, atol=0, msg=name)
    for a, b in zip(plain[2], recomputed[2]):
        assert a["step_flops"] == b["step_flops"] == a["executed_step_flops"]
        assert b["executed_step_flops"] > 1.2 * b["step_flops"]  # a forward pass is ~1/3 of a step


# -- a rank dies during a sharded save ---------------------------------------------------------------

KILL_DURING_SAVE = '''
import os, signal, sys
from pathlib import Path
import torch.distributed.checkpoint as dcp

marker = Path(os.environ["KILL_MARKER"])
original = dcp.FileSystemWriter.write_data
saves = []

def write_data(self, plan, planner):
    # Rank 1 writes its shard of the second checkpoint, then dies by SIGKILL before the save is
    # complete (rank 0 has not written .metadata), once.
    future = original(self, plan, planner)
    saves.append(1)
    if os.environ["RANK"] == "1" and len(saves) == 2 and not marker.exists():
        future.wait()
        marker.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return future

dcp.FileSystemWriter.write_data = write_data
from condcomp.cli import main
sys.exit(main())
'''


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint(text_file, tmp_path):
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    run_dir = tmp_path / "run"
    sets = tiny_overrides(text_file, run_dir, tmp_path / "cache", **{
        "train.steps": 10, "train.batch_size": 4, "train.checkpoint_every": 4, "train.eval_every": 5,
        "train.fsdp": True})
    env = {**os.environ, "KILL_MARKER": str(tmp_path / "killed"), "CONDCOMP_DIST_TIMEOUT": "60",
           "PYTHONUNBUFFERED": "1"}

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *extra, str(script), "train",
               *[a for s in sets for a in ("--set", s)]]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)

    killed = torchrun("--max-restarts", "0")
    assert killed.returncode != 0 and (tmp_path / "killed").exists()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]  # step 8 never became visible
    verify_checkpoint(list_checkpoints(run_dir)[0])

    # One restart allowed, as in test_distributed: gloo may abort a fresh rank at start-up under load.
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "1", str(script), "train",
         *[a for s in sets for a in ("--set", s)], "--resume"], capture_output=True, text=True, env=env,
        timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4 on 2 rank(s)" in resumed.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000008", "step_00000010"]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert all("memory.state_gib" in r and "memory.peak_rss_gib" in r for r in records if "loss" in r)


# -- memory you can see ------------------------------------------------------------------------------

def test_planned_state_memory_arithmetic():
    from condcomp.distributed.fsdp import planned_state_memory
    from condcomp.models import Transformer

    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn=moe",
                             "model.moe.num_experts=4"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert 0 < experts < total
    whole = planned_state_memory(model, world=4, expert_parallel=1, fsdp=False)
    assert whole.total == 16 * total and whole.params == 4 * total and whole.optimizer == 8 * total
    sharded = planned_state_memory(model, world=4, expert_parallel=2, fsdp=True)
    assert sharded.total == pytest.approx(16 * (experts / 2 + (total - experts) / 4))
    assert planned_state_memory(model, world=4, expert_parallel=1, fsdp=True).total == pytest.approx(16 * total / 4)
    assert planned_state_memory(model, world=4, expert_parallel=2, fsdp=False).total == \
        pytest.approx(16 * (experts / 2 + total - experts))


def test_a_run_over_the_memory_limit_is_refused_with_the_world_size_that_fits(tiny_config, tmp_path):
    from condcomp.distributed import DistributedError
    from condcomp.train import Trainer

    cfg = tiny_config("run", **{"train.max_memory_gb": 1e-4})  # ~107 KB; the tiny model's state is ~1.4 MB
    with pytest.raises(DistributedError, match=r"training state needs .* GiB per rank .* over train.max_memory_gb=0.0001; "
                                               r"set train.fsdp: true and launch on \d+ ranks"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(DistributedError, match=r"on 1 rank\(s\), over .*; launch on \d+ ranks"):
        Trainer(tiny_config("run", **{"train.max_memory_gb": 1e-4, "train.fsdp": True}))  # fsdp set: ranks only
    ok = Trainer(tiny_config("fits", **{"train.max_memory_gb": 1.0}))
    assert ok.state_memory["state_gib"] * 2**30 == pytest.approx(16 * ok.model.num_parameters())
    ok.lock.release()


def test_a_sharded_checkpoint_exports_to_hugging_face_and_initialises_a_run(tiny_config, tmp_path):
    """One process with train.fsdp writes the sharded format; `condcomp export` turns it into a Llama
    folder that transformers loads with the same logits, and model.init accepts it."""
    import transformers

    from condcomp.cli import main
    from condcomp.train import Trainer, load_model
    from condcomp.train.checkpoint import checkpoint_format

    Trainer(tiny_config("run", **{"train.steps": 2, "train.checkpoint_every": 2, "train.fsdp": True})).train()
    saved = list_checkpoints(tmp_path / "run")[-1]
    assert checkpoint_format(saved) == "sharded" and not (saved / "model.safetensors").exists()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    model, _ = load_model(tmp_path / "run")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True,
                                                             dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)

    child = Trainer(tiny_config("child", **{"train.steps": 1, "model.init": str(tmp_path / "run")}))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(child.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    child.lock.release()
