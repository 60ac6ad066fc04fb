"""Data and expert parallelism on real gloo process groups (2 and 4 ranks on this machine).

Each test starts its ranks like torchrun does (tests/dist_workers.py) and checks the distributed
result against the single-process one: the reference twin of expert-parallel dispatch is ``dispatch``
with every expert in one process, and the reference of data-parallel training is one process on
the combined batch.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from condcomp.config import load_config
from condcomp.dispatch import dispatch
from condcomp.layers.experts import Experts
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, TopKRouter
from condcomp.routing.types import Routing

from conftest import tiny_overrides
from dist_workers import free_port, run_ranks

D, D_FF, E = 8, 12, 4

ROUTERS = {
    "top1_capacity1.25": dict(kind="top_k", k=1, capacity_factor=1.25),
    "top2_dropless": dict(kind="top_k", k=2, capacity_factor=None),
    "top2_capacity1_swiglu_shared": dict(kind="top_k", k=2, capacity_factor=1.0, activation="swiglu", shared=6),
    "expert_choice_global": dict(kind="expert_choice", capacity_factor=2.0, mode="global"),
    "expert_choice_per_position": dict(kind="expert_choice", capacity_factor=2.0, mode="per_position"),
}


def make_moe(kind, capacity_factor, k=1, mode="global", activation="gelu", shared=None) -> MoE:
    torch.manual_seed(0)
    if kind == "top_k":
        router = TopKRouter(d_model=D, num_experts=E, k=k, capacity_factor=capacity_factor)
    else:
        router = ExpertChoiceRouter(d_model=D, num_experts=E, capacity_factor=capacity_factor, mode=mode)
    return MoE(d_model=D, d_ff=D_FF, num_experts=E, router=router, activation=activation,
               shared_expert_d_ff=shared).double()


def rank_inputs(world: int):
    """Every rank's input and loss weights, generated identically in every process."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(world, 3, 10, D, generator=g, dtype=torch.float64),
            torch.randn(world, 3, 10, D, generator=g, dtype=torch.float64))


def moe_loss(moe, x, w):
    y, info = moe(x)
    return y, (y * w).sum() + 0.1 * sum(info.aux_losses.values())


def ep_moe_worker(rank: int, world: int, ep: int) -> dict:
    """Expert-parallel MoE vs the same MoE whole in this process: outputs, input and router gradients
    of this rank's batch, expert gradients of the global loss (after the replica reduction)."""
    from condcomp.distributed import init_distributed, reduce_expert_grads, shard_experts

    rt = init_distributed(expert_parallel=ep)
    X, W = rank_inputs(world)
    checked = {}
    for name, spec in ROUTERS.items():
        moe = make_moe(**spec)
        reference = copy.deepcopy(moe)
        shard_experts(moe, rt.expert_group)
        lo, hi = moe.placement.first, moe.placement.first + moe.placement.num_local

        x = X[rank].clone().requires_grad_(True)
        y, loss = moe_loss(moe, x, W[rank])
        loss.backward()
        reduce_expert_grads(moe, rt)

        # Reference: this rank's batch for outputs and local gradients ...
        local = copy.deepcopy(reference)
        x_ref = X[rank].clone().requires_grad_(True)
        y_ref, loss_ref = moe_loss(local, x_ref, W[rank])
        loss_ref.backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=f"{name}: outputs")
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10, msg=f"{name}: input grads")
        ref_params = dict(local.named_parameters())
        for n, p in moe.named_parameters():  # router and shared expert: replicated, local gradients
            if not n.startswith("experts."):
                torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-10, atol=1e-10, msg=f"{name}: {n}")
        # ... every rank's batch for the experts: grad of the mean of all ranks' losses.
        everyone = copy.deepcopy(reference)
        for r in range(world):
            moe_loss(everyone, X[r], W[r])[1].div(world).backward()
        for part in ("up", "down"):
            torch.testing.assert_close(getattr(moe.experts, part).grad, getattr(everyone.experts, part).grad[lo:hi],
                                       rtol=1e-10, atol=1e-10, msg=f"{name}: expert {part} grads")
        # Inference (expert choice per position uses its learned thresholds here).
        with torch.no_grad():
            moe.eval(), local.eval()
            torch.testing.assert_close(moe(X[rank])[0], local(X[rank])[0], rtol=1e-10, atol=1e-10,
                                       msg=f"{name}: eval outputs")
        checked[name] = (lo, hi)
    return checked


def test_expert_parallel_moe_equals_single_process_two_ranks(tmp_path):
    results = run_ranks(ep_moe_worker, 2, tmp_path, 2)
    assert results[0] == {name: (0, 2) for name in ROUTERS}
    assert results[1] == {name: (2, 4) for name in ROUTERS}


def test_expert_parallel_with_replicas_four_ranks(tmp_path):
    """4 ranks, experts over 2: each expert has 2 replicas whose gradients are averaged."""
    results = run_ranks(ep_moe_worker, 4, tmp_path, 2)
    assert [r["top2_dropless"] for r in results] == [(0, 2), (2, 4), (0, 2), (2, 4)]


def uneven_dispatch_worker(rank: int, world: int) -> bool:
    """Hand-made routings with uneven and empty splits (rank 1 receives no token at all; on one rank no
    token is routed anywhere), then random routings with loads from zero up."""
    from condcomp.distributed import dispatch_expert_parallel, init_distributed, shard_experts

    rt = init_distributed(expert_parallel=world)
    torch.manual_seed(0)
    full = Experts(num_experts=E, d_model=D, d_ff=D_FF).double()
    moe = MoE(d_model=D, d_ff=D_FF, num_experts=E).double()
    moe.experts = copy.deepcopy(full)
    shard_experts(moe, rt.expert_group)
    g = torch.Generator().manual_seed(10 + rank)
    n = 7
    cases = {
        "all to expert 0": Routing(token_index=torch.arange(n), group_sizes=torch.tensor([n, 0, 0, 0]),
                                   combine_weights=torch.rand(n, generator=g, dtype=torch.float64), num_tokens=n,
                                   dropped=torch.zeros(n, dtype=torch.bool)),
        "nothing routed on rank 0": Routing(
            token_index=torch.arange(n) if rank else torch.zeros(0, dtype=torch.long),
            group_sizes=torch.tensor([2, 1, 0, 4]) if rank else torch.zeros(E, dtype=torch.long),
            combine_weights=torch.rand(n if rank else 0, generator=g, dtype=torch.float64), num_tokens=n,
            dropped=torch.zeros(n, dtype=torch.bool)),
    }
    for trial in range(20):  # random routings: any token any number of times, loads from 0 up, per rank
        a = int(torch.randint(0, 3 * n, (), generator=g))
        cuts = torch.sort(torch.randint(0, a + 1, (E - 1,), generator=g)).values
        sizes = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([a])]))
        cases[f"random {trial}"] = Routing(
            token_index=torch.randint(0, n, (a,), generator=g), group_sizes=sizes,
            combine_weights=torch.rand(a, generator=g, dtype=torch.float64), num_tokens=n,
            dropped=torch.zeros(n, dtype=torch.bool))
    for name, routing in cases.items():
        x = torch.randn(n, D, generator=g, dtype=torch.float64, requires_grad=True)
        w = routing.combine_weights.clone().requires_grad_(True)
        routing.combine_weights = w
        y = dispatch_expert_parallel(x, routing, moe.experts, moe.placement)
        y.pow(2).sum().backward()
        x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        ref = copy.deepcopy(full)
        routing.combine_weights = w_ref
        y_ref = dispatch(x_ref, routing, ref)
        if y_ref.requires_grad:  # the reference returns constant zeros when nothing is routed
            y_ref.pow(2).sum().backward()
        torch.testing.assert_close(y, y_ref, msg=name)
        for got, want in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, msg=name)
        moe.experts.zero_grad()
    return True


def test_expert_parallel_dispatch_uneven_and_empty_splits(tmp_path):
    assert run_ranks(uneven_dispatch_worker, 2, tmp_path) == [True, True]


# -- training -----------------------------------------------------------------------------------

MOE_EP = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.capacity_factor": "null",
          "train.expert_parallel": 2}
# Routing with a capacity, and the load-balancing losses, are computed over each rank's tokens; with
# dropless top-k and the aux weights at 0 every token's treatment is independent of the batch, so the
# 2-rank run must match the 1-process run on the combined batch.
NO_AUX = {"train.aux_loss_weights.load_balance": 0.0, "train.aux_loss_weights.z_loss": 0.0}


def train_worker(rank: int, world: int, overrides: list[str], until: int | None, resume: bool) -> dict:
    from condcomp.distributed import full_experts
    from condcomp.train import Trainer

    trainer = Trainer(load_config(None, overrides), resume=resume)
    result = trainer.train(until=until)
    with full_experts(trainer.model):
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {"losses": result.losses, "state": state, "step": result.step, "val_bpb": result.val_bpb}


def train_single(overrides, until=None, resume=False) -> dict:
    from condcomp.train import Trainer

    trainer = Trainer(load_config(None, overrides), resume=resume)
    result = trainer.train(until=until)
    return {"losses": result.losses, "state": trainer.model.state_dict(), "step": result.step,
            "val_bpb": result.val_bpb}


def assert_same_training(got: dict, want: dict, tol: float) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=tol, atol=tol)
    assert got["state"].keys() == want["state"].keys()
    for name, value in want["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("variant, world", [("dense", 2), ("moe_expert_parallel", 2), ("moe_expert_parallel", 4)])
def test_data_parallel_training_equals_one_process_on_the_combined_batch(variant, world, text_file, tmp_path):
    """10 steps on 2 ranks (or on 4, where each expert has 2 replicas) == 10 steps of one process."""
    # A checkpoint at step 5 gathers the expert shards mid-run: training must go on unchanged after it.
    extra = {"train.steps": 10, "train.batch_size": 4, "train.checkpoint_every": 5,
             **({} if variant == "dense" else {**MOE_EP, **NO_AUX})}
    ranks = run_ranks(train_worker, world, tmp_path / "spawn",
                      tiny_overrides(text_file, tmp_path / "ddp", tmp_path / "cache", **extra), None, False)
    single_extra = {k: v for k, v in extra.items() if k != "train.expert_parallel"}
    single = train_single(tiny_overrides(text_file, tmp_path / "single", tmp_path / "cache", **single_extra))
    for r in ranks:
        assert r["losses"] == ranks[0]["losses"]  # the logged loss is the whole batch's, on every rank
        assert_same_training(r, single, tol=2e-5)
        assert r["val_bpb"] == pytest.approx(single["val_bpb"], rel=1e-5)
    # Metrics and checkpoints come from rank 0 only, whole.
    lines = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 11))
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHRINK = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.seq_len": 32, "train.steps": 4,
          "train.batch_size": 4, "train.warmup_steps": 2, "train.eval_every": 4, "train.eval_batches": 2,
          "train.checkpoint_every": 4, "train.log_every": 1, "train.progress": False, "train.precision": "fp32"}
# Whose every token's treatment depends on its own sequence only (and whose aux losses are means over
# tokens), so data parallelism must not change the numbers. The others route or balance over the
# batch a rank sees (expert capacity, load balance, skip-rate target), as every DP implementation does.
BATCH_INDEPENDENT = {"dense", "mod", "colt5", "srupp"}


def every_config_worker(rank: int, world: int, runs: dict) -> dict:
    from condcomp.train import Trainer

    out = {}
    for name, (config, overrides) in runs.items():
        trainer = Trainer(load_config(config, overrides))
        out[name] = trainer.train().losses
    return out


def test_every_shipped_config_trains_data_parallel(text_file, tmp_path):
    """Each configs/*.yaml, shrunk, trains on 2 ranks (MoE ones expert-parallel) and leaves a checkpoint
    one process loads; the batch-independent ones match one process on the combined batch."""
    from condcomp.train import Trainer, load_model

    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert {"dense", "moe-top1", "moe-ec", "mod", "skip", "colt5", "srupp"} <= set(names)
    def overrides(name, where):
        extra = {**SHRINK, **({"train.expert_parallel": 2} if name.startswith("moe") and where == "ddp" else {})}
        return tiny_overrides(text_file, tmp_path / where / name, tmp_path / "cache", **extra)
    runs = {n: (str(CONFIGS / f"{n}.yaml"), overrides(n, "ddp")) for n in names}
    ranks = run_ranks(every_config_worker, 2, tmp_path / "spawn", runs)
    for name in names:
        assert ranks[0][name] == ranks[1][name]
        assert all(map(torch.isfinite, torch.tensor(ranks[0][name]))), name
        model, _ = load_model(tmp_path / "ddp" / name)  # the 2-rank checkpoint, in this one process
        assert model.num_parameters() > 0
        if name in BATCH_INDEPENDENT:
            single = Trainer(load_config(runs[name][0], overrides(name, "single"))).train().losses
            torch.testing.assert_close(torch.tensor(ranks[0][name]), torch.tensor(single), rtol=1e-4, atol=1e-4,
                                       msg=name)


def test_two_rank_checkpoint_resumes_on_one_rank_and_back(text_file, tmp_path):
    """A 2-rank expert-parallel run stopped at step 4 continues in one process to step 8, and that
    run's step-8 checkpoint continues on 2 ranks to 12: the loss curve and the weights are the ones of
    an uninterrupted single-process run."""
    extra = {"train.steps": 12, "train.batch_size": 4, "train.checkpoint_every": 4, **MOE_EP, **NO_AUX}
    dist_args = tiny_overrides(text_file, tmp_path / "run", tmp_path / "cache", **extra)
    single_args = [a for a in dist_args if not a.startswith("train.expert_parallel")]
    first = run_ranks(train_worker, 2, tmp_path / "spawn1", dist_args, 4, False)
    assert first[0]["step"] == 4
    middle = train_single(single_args, until=8, resume=True)
    last = run_ranks(train_worker, 2, tmp_path / "spawn2", dist_args, None, True)
    reference = train_single(tiny_overrides(text_file, tmp_path / "reference", tmp_path / "cache",
                                            **{k: v for k, v in extra.items() if k != "train.expert_parallel"}))
    curve = first[0]["losses"] + middle["losses"] + last[0]["losses"]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference["losses"]), rtol=2e-5, atol=2e-5)
    assert_same_training({"losses": [], "state": last[0]["state"]}, {"losses": [], "state": reference["state"]}, 2e-5)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 13))  # one record per step across the three launches


def evaluate_worker(rank: int, world: int, overrides: list[str]) -> float:
    import numpy as np

    from condcomp.train import Trainer, evaluate

    trainer = Trainer(load_config(None, overrides))
    # 7 windows in batches of 3: the last batch has one window, so rank 1 has none of it.
    data = np.frombuffer(bytes(range(256)) * 2, dtype=np.uint8)[: 7 * 32 + 1]
    return evaluate(trainer.model, data, batch_size=3, max_batches=10, rt=trainer.rt)


def test_distributed_evaluation_equals_single_process_with_a_short_last_batch(text_file, tmp_path):
    import numpy as np

    from condcomp.train import Trainer, evaluate

    extra = {**MOE_EP}
    ranks = run_ranks(evaluate_worker, 2, tmp_path / "spawn", tiny_overrides(text_file, tmp_path / "a", tmp_path / "c",
                                                                             **extra))
    single = Trainer(load_config(None, tiny_overrides(text_file, tmp_path / "b", tmp_path / "c", **{
        k: v for k, v in extra.items() if k != "train.expert_parallel"})))
    data = np.frombuffer(bytes(range(256)) * 2, dtype=np.uint8)[: 7 * 32 + 1]
    want = evaluate(single.model, data, batch_size=3, max_batches=10)
    assert ranks[0] == pytest.approx(want, rel=1e-6) and ranks[1] == ranks[0]


# -- a rank dies ----------------------------------------------------------------------------------

KILLER = '''
import os, signal, sys, time
from pathlib import Path
from condcomp.train import trainer

marker = Path(os.environ["KILL_MARKER"])
original = trainer.Trainer.train_step

def train_step(self):
    # Rank 1 fails at the start of step KILL_AT_STEP + 1, once (the marker says it did): it dies by
    # SIGKILL, or with FAULT=hang stops answering.
    if os.environ["RANK"] == "1" and self.step == int(os.environ["KILL_AT_STEP"]) and not marker.exists():
        marker.write_text("failed")
        if os.environ.get("FAULT") == "hang":
            time.sleep(300)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self)

trainer.Trainer.train_step = train_step
from condcomp.cli import main
sys.exit(main())
'''


def torchrun(tmp_path, text_file, run_dir, *, restarts=0, resume=False, fault="kill",
             timeout_s=60) -> subprocess.CompletedProcess:
    """A 2-rank expert-parallel ``condcomp train`` job under torchrun, 10 steps with checkpoints every
    4, in which rank 1 fails at step 7 unless the marker file says it already did once."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    sets = tiny_overrides(text_file, run_dir, tmp_path / "cache", **{
        "train.steps": 10, "train.batch_size": 4, "train.checkpoint_every": 4, "train.eval_every": 5, **MOE_EP})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", str(restarts), str(script), "train",
           *[a for s in sets for a in ("--set", s)]]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "KILL_AT_STEP": "6", "KILL_MARKER": str(tmp_path / "failed"),
           "CONDCOMP_DIST_TIMEOUT": str(timeout_s), "FAULT": fault, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def logged_steps(run_dir: Path) -> list[int]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_a_killed_rank_fails_the_job_clearly_and_a_restart_resumes(text_file, tmp_path):
    from condcomp.train.checkpoint import list_checkpoints, verify_checkpoint

    run_dir = tmp_path / "run"
    killed = torchrun(tmp_path, text_file, run_dir)
    assert killed.returncode != 0
    # torchrun names the rank that died and how; the surviving rank, if it outlives its peer long
    # enough to notice, says what to do instead of printing a gloo traceback.
    assert "Root Cause" in killed.stderr and "rank      : 1" in killed.stderr and "SIGKILL" in killed.stderr
    assert "Traceback" not in "".join(l for l in killed.stderr.splitlines(True) if l.startswith("[rank0]"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    verify_checkpoint(list_checkpoints(run_dir)[-1])

    # One torchrun restart is allowed: gloo has been seen to abort a fresh rank at start-up under load
    # ("terminate called without an active exception"; see the next test). Any attempt resumes from
    # the newest intact checkpoint.
    again = torchrun(tmp_path, text_file, run_dir, resume=True, restarts=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "from step 4 on 2 rank(s)" in again.stdout
    assert "finished step 10" in again.stdout
    assert logged_steps(run_dir) == list(range(1, 11))


def test_torchrun_restarts_resume_automatically(text_file, tmp_path):
    run_dir = tmp_path / "run"
    # One restart is needed; a second is allowed because gloo, rebuilding its connections right after
    # a peer was killed, has been seen to abort a fresh rank ("terminate called without an active
    # exception", about 1 run in 4 under load). Any attempt resumes from the same step-4 checkpoint.
    result = torchrun(tmp_path, text_file, run_dir, restarts=2, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "failed").exists()  # rank 1 really died once
    assert "from step 4 on 2 rank(s)" in result.stdout and "finished step 10" in result.stdout
    assert logged_steps(run_dir) == list(range(1, 11))


# -- bad setups fail before training, on every rank, with the fix in the message -------------------

def test_expert_parallel_in_a_single_process_is_refused(tiny_config):
    from condcomp.distributed import DistributedError
    from condcomp.train import Trainer

    with pytest.raises(DistributedError, match="torchrun --nproc-per-node 2"):
        Trainer(tiny_config(**{"model.ffn": "moe", "train.expert_parallel": 2}))


@pytest.mark.parametrize("sets, message", [
    ({"train.expert_parallel": 2}, "needs MoE layers"),
    ({"model.ffn": "moe", "model.moe.num_experts": 6, "train.expert_parallel": 4}, "must divide model.moe.num_experts=6"),
])
def test_expert_parallel_config_errors_fail_at_load(sets, message, text_file, tmp_path):
    from condcomp.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_overrides(text_file, tmp_path / "run", tmp_path / "cache", **sets))


def bad_setup_worker(rank: int, world: int, overrides: list[str]) -> dict:
    from condcomp.distributed import DistributedError
    from condcomp.train import Trainer, TrainingError

    cases = {"batch": {"train.batch_size": 3},
             "ranks": {"model.ffn": "moe", "train.expert_parallel": 4}}
    messages = {}
    for name, sets in cases.items():
        try:
            Trainer(load_config(None, overrides + [f"{k}={v}" for k, v in sets.items()]))
            messages[name] = None
        except (TrainingError, DistributedError) as e:
            messages[name] = str(e)
    return messages


def test_bad_distributed_setups_fail_clearly_on_every_rank(text_file, tmp_path):
    ranks = run_ranks(bad_setup_worker, 2, tmp_path / "spawn",
                      tiny_overrides(text_file, tmp_path / "run", tmp_path / "cache"))
    assert ranks[0] == ranks[1]
    m = ranks[0]
    assert "batch_size=3" in m["batch"] and "multiple of 2" in m["batch"]
    assert "must divide the number of ranks (2)" in m["ranks"]


def test_a_hung_rank_times_out_with_the_same_message(text_file, tmp_path):
    """Rank 1 stops answering instead of dying: rank 0's collective times out after
    CONDCOMP_DIST_TIMEOUT seconds and it ends the job, naming the checkpoint to resume from."""
    hung = torchrun(tmp_path, text_file, tmp_path / "run", fault="hang", timeout_s=10)
    assert hung.returncode != 0
    assert "condcomp train: error: rank 0 of 2: another rank stopped answering during step 7" in hung.stderr
    assert "step_00000004" in hung.stderr and "--resume" in hung.stderr
