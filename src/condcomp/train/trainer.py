"""The training loop: AdamW, warmup + cosine, clipping, bf16 autocast, validation in bits per byte,
executed-FLOP counting, JSONL metrics and exact resume.

Under torchrun the same loop is data parallel (DDP; each of N ranks takes 1/N of every batch) and,
with ``train.expert_parallel``, expert parallel. Checkpoints are written whole, as one process
holding every expert would write them, so they load in a single process or on any number of ranks.
With ``train.fsdp`` parameters, gradients and optimizer state are sharded over the ranks (FSDP2)
and every rank writes its own shards of each checkpoint (``sharded_checkpoint``); those load on any
number of ranks too, and ``condcomp consolidate`` turns one into a single file.

Exactness: the batch of step s depends only on (seed, s), and a checkpoint holds the model,
optimizer, schedule, torch RNG and counters, so ``--resume`` continues bit-for-bit as if the run
had never stopped (fp32; bf16 autocast is deterministic on CPU too, but not promised).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from condcomp.config import RunConfig, config_from_saved
from condcomp.data import eval_batches, train_batch
from condcomp.distributed import (DistributedError, Runtime, clip_grad_norm, full_experts, full_optimizer_state,
                                  ignore_in_ddp, init_distributed, reduce_expert_grads, shard_experts,
                                  shard_optimizer_state, sharded_parameters)
from condcomp.distributed.fsdp import (GIB, check_memory_limit, clip_grad_norm_sharded, local_state_memory,
                                       shard_model, sync_buffers)
from condcomp.flops import flop_counter
from condcomp.layers.traits import (aux_loss_names, calibrate_added_parameters, prompt_length, selects_tokens,
                                   set_training_progress)
from condcomp.models import Transformer
from condcomp.recompute import count_recomputed_flops
from condcomp.routing import RoutingError
from condcomp.settings import changed_keys
from condcomp.train import checkpoint as ckpt
from condcomp.train.allocator import release_free_memory, tune_allocator, tune_for_speed
from condcomp.train.metrics_log import MetricsLog
from condcomp.train.optim import autocast, build_optimizer, warmup_cosine
from condcomp.train.pretrained_init import load_init_weights, load_model, load_run_corpus  # noqa: F401 (load_model: re-exported)
from condcomp.train.run_guard import RunLock, StopRequest
from condcomp.train.sharded_checkpoint import load_sharded, save_sharded

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, misconfigured run folder, ...); the message says what to do."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM: training stopped after a checkpoint; the message says how to resume."""


# The schedule under its historical name (benchmarks and tests import it from here).
lr_factor = warmup_cosine


IGNORE = -100  # a target the losses skip (F.cross_entropy's ignore_index)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats over the targets that are not ``IGNORE``. logits [b, t, v],
    targets [b, t]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def scored_from(targets: torch.Tensor, position: int) -> torch.Tensor:
    """targets [b, t] with positions before ``position`` set to ``IGNORE`` (a copy when any is)."""
    if position <= 0:
        return targets
    targets = targets.clone()
    targets[:, :position] = IGNORE
    return targets


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats per scored position (targets != IGNORE). logits [b, t, v]."""
    keep = (targets != IGNORE).reshape(-1)
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1])[keep], dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1])[keep], dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@torch.no_grad()
def evaluate_split(model: Transformer, data, *, batch_size: int, max_batches: int, precision: str = "fp32",
                   rt: Runtime | None = None, token_bytes=None, from_position: int = 0) -> dict[str, float]:
    """Loss over fixed windows of a split: {"bpb": bits per byte, "nll": nats per token, "tokens",
    "bytes"}. data: token array [n]; token_bytes: bytes of text per token [n] (None: one byte per
    token, a byte-level corpus).

    from_position: score only the targets from this position of each window on (a model whose
    layers read a whole prompt first, ``prompt_length``; pass the same to a model it is compared with).

    Distributed (``rt``): every rank evaluates its share of each batch and the sums are reduced, so
    the result equals the single-process one. All ranks must call it together.
    """
    rt = rt or Runtime()
    was_training = model.training
    model.eval()
    nll, tokens, nbytes = 0.0, 0.0, 0.0
    for batch in eval_batches(data, batch_size=batch_size, seq_len=model.cfg.seq_len, max_batches=max_batches,
                              token_bytes=token_bytes):
        x, y = batch[0].tensor_split(rt.world_size)[rt.rank], batch[1].tensor_split(rt.world_size)[rt.rank]
        y = y[:, from_position:]
        b = y.numel() if token_bytes is None else float(batch[2].tensor_split(rt.world_size)[rt.rank][:, from_position:].sum())
        weight = 1.0
        if x.shape[0] == 0:
            # A short last batch left this rank without a window; run one anyway (an expert-parallel
            # forward is a collective every rank must join) and count it zero times.
            x, y, weight = x.new_zeros(1, x.shape[1]), y.new_zeros(1, y.shape[1]), 0.0
        with autocast(precision, rt.device.type):
            logits = model(x.to(rt.device)).logits[:, from_position:]
        nll += weight * lm_loss(logits, y.to(rt.device)).item() * y.numel()
        tokens += weight * y.numel()
        nbytes += weight * b
    model.train(was_training)
    nll, tokens, nbytes = rt.all_reduce(nll), rt.all_reduce(tokens), rt.all_reduce(nbytes)
    return {"bpb": nll / nbytes / LN2, "nll": nll / tokens, "tokens": tokens, "bytes": nbytes}


def evaluate(model: Transformer, data, *, batch_size: int, max_batches: int, precision: str = "fp32",
             rt: Runtime | None = None, token_bytes=None, from_position: int = 0) -> float:
    """Bits per byte over fixed windows of ``data`` (see ``evaluate_split``)."""
    return evaluate_split(model, data, batch_size=batch_size, max_batches=max_batches, precision=precision,
                          rt=rt, token_bytes=token_bytes, from_position=from_position)["bpb"]


_LOST_PEER_SIGNS = ("connection closed", "connection reset", "remote worker", "timed out", "timeout",
                    "broken pipe", "nccl error")


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank died or hung (gloo and NCCL raise plain
    RuntimeErrors for this, so the message is all there is to go on)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return any(sign in text for sign in _LOST_PEER_SIGNS)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole checkpoint's optimizer state (indexed by position, every tensor whole) into an
    optimizer over FSDP shards: name each entry by its parameter, and let torch.distributed.checkpoint
    cut out this rank's pieces."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: entry for i, entry in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_bpb: float | None
    losses: list[float]
    total_flops: float
    checkpoint: Path | None


def _scalar_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if torch.is_tensor(v):
            if v.numel() == 1:
                out[k] = v.item()
            else:
                out[k] = v.tolist()
        else:
            out[k] = v
    return out


class Trainer:
    """Trains a Transformer LM on a byte corpus as a RunConfig says (one process, or every rank of a
    torchrun job: all ranks build the Trainer and call ``train`` together)."""

    def __init__(self, cfg: RunConfig, *, resume: str | Path | bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        tc = cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.low_memory:
            tune_allocator()  # before the model exists: its activations vary in shape from step to step
        elif tc.fast_allocator:
            tune_for_speed()
        self.rt = init_distributed(expert_parallel=tc.expert_parallel, device=tc.device)
        if tc.batch_size % self.rt.world_size:
            raise TrainingError(f"train.batch_size={tc.batch_size} is the batch over all ranks and must divide "
                                f"evenly among the {self.rt.world_size} ranks; use a multiple of {self.rt.world_size}")
        torch.manual_seed(tc.seed)  # the same on every rank: identical initial weights
        self.corpus, self.tokenizer = load_run_corpus(cfg)
        if self.corpus.skipped and self.rt.is_main:
            print(f"data: {self.corpus.description}")
        unit = "bytes" if self.tokenizer is None else "tokens"
        for split in ("train", "val"):
            if len(self.corpus.split(split)) < cfg.model.seq_len + 1:
                raise TrainingError(
                    f"the {split} split of {self.corpus.description} has {len(self.corpus.split(split))} {unit}, "
                    f"fewer than model.seq_len + 1 = {cfg.model.seq_len + 1}; use more text or a smaller model.seq_len")
        if tc.max_memory_gb is not None:
            with torch.device("meta"):  # shapes only: refuse before allocating anything
                planned = Transformer(cfg.model)
            check_memory_limit(planned, limit_gb=tc.max_memory_gb, world=self.rt.world_size,
                               expert_parallel=tc.expert_parallel, fsdp=tc.fsdp)
            del planned
        self.model = Transformer(cfg.model)
        self.model.checkpoint_blocks = tc.activation_checkpointing
        missing = sorted(aux_loss_names(self.model) - set(tc.aux_loss_weights))
        if missing:
            raise TrainingError(f"the model's layers return aux loss(es) {missing} but train.aux_loss_weights has no "
                                f"weight for them; add train.aux_loss_weights.{missing[0]}: <weight> (0 to ignore it)")
        # Layers that read a whole prompt first (input-conditioned pruning) are causal from the
        # prompt's last position on: earlier targets are left out of every loss.
        self.loss_from = max(0, prompt_length(self.model) - 1)
        self.teacher = self._load_teacher() if tc.distill > 0 else None
        self.step = 0
        self.total_flops = 0.0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.last_step_flops = 0.0  # model FLOPs: forward and backward, as if nothing were recomputed
        self.total_executed_flops = 0.0  # plus the blocks recomputed in backward (activation checkpointing)
        self.last_step_executed_flops = 0.0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.metrics = MetricsLog(self.metrics_path)
        # One training process per run folder (rank 0 holds it for the whole job).
        self.lock = RunLock(self.run_dir)
        if self.rt.is_main:
            self.lock.acquire(TrainingError)
        # Weights are loaded whole, then split across ranks; optimizer state follows the split.
        try:
            state = self._prepare_run_dir(resume)
        except BaseException:
            self.lock.release()
            raise
        if state is None and cfg.model.init:
            message = load_init_weights(self.model, cfg.model.init)
            calibrated = self._calibrate_added_parameters()
            if self.rt.is_main:
                print(message)
                if calibrated:
                    print(calibrated)
                if tc.lr > 1e-3:
                    print(f"note: train.lr={tc.lr:g} is a from-scratch learning rate; fine-tuning pretrained weights "
                          "usually wants 1e-4 or lower (--set train.lr=1e-4)")
        self.train_model = self._distribute()
        self.optimizer = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay,
                                         betas=(tc.beta1, tc.beta2))
        warmup, total, floor = tc.warmup_steps, tc.steps, tc.min_lr_ratio  # bound now, not read live
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=warmup, total=total, min_ratio=floor,
                                                budget_progress=self.budget_progress()))
        if state is not None:
            if "sharded" in state:  # weights and optimizer state were left for now, when they have a place
                load_sharded(state["sharded"], self.model, self.optimizer, self.rt)
            else:
                optimizer_state = state["optimizer"]
                if self.expert_parallel:
                    optimizer_state = shard_optimizer_state(optimizer_state, self.optimizer, self.model)
                if self.fsdp:
                    load_whole_optimizer_state(self.model, self.optimizer, optimizer_state)
                else:
                    self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
        self.state_memory = self._report_state_memory()

    def _load_teacher(self) -> Transformer:
        """The frozen model to distil from: what ``model.init`` names, as it is (before any conversion)."""
        from condcomp.train.pretrained_init import load_model_source

        init = self.cfg.model.init
        if not init:
            raise TrainingError("train.distill needs a teacher: set model.init to the dense model the run starts from "
                                "(a condcomp run, a Hugging Face folder or smollm2), or set train.distill: 0")
        teacher, _ = load_model_source(str(init), seq_len=self.cfg.model.seq_len)
        if teacher.cfg.vocab_size != self.cfg.model.vocab_size:
            raise TrainingError(f"train.distill: the teacher {init} has vocab_size {teacher.cfg.vocab_size} but this "
                                f"model has {self.cfg.model.vocab_size}; distil from a model with the same tokens")
        return teacher.eval().requires_grad_(False).to(self.rt.device)

    @property
    def expert_parallel(self) -> bool:
        return self.rt.expert_parallel > 1

    @property
    def fsdp(self) -> bool:
        """Parameters are FSDP shards (train.fsdp under torchrun; a single process keeps them whole)."""
        return self.cfg.train.fsdp and self.rt.distributed

    def _report_state_memory(self) -> dict[str, float]:
        """Per-rank GiB of parameters, gradients and AdamW state (the largest rank's), printed once."""
        mine = local_state_memory(self.model).as_gib()
        most = {k: self.rt.all_reduce(v, "max") for k, v in mine.items()}
        if self.rt.is_main:
            how = "sharded (FSDP)" if self.fsdp else "whole on every rank" if self.rt.distributed else "one process"
            print(f"training state per rank, {how}: {most['state_gib']:.3f} GiB (parameters {most['params_gib']:.3f}, "
                  f"gradients {most['grads_gib']:.3f}, AdamW {most['optimizer_gib']:.3f})")
        return most

    def _distribute(self) -> torch.nn.Module:
        """Move the model to this rank's device, shard its experts and wrap it in DDP. Returns the module
        to train through (the DDP wrapper, or the model itself in a single process)."""
        self.model.to(self.rt.device)
        if not self.rt.distributed:
            return self.model
        experts = shard_experts(self.model, self.rt.expert_group) if self.expert_parallel else []
        if self.fsdp:
            # FSDP shards all but the expert shards; no wrapper: the model itself is the sharded module.
            shard_model(self.model, self.rt, precision=self.cfg.train.precision,
                        keep_whole=sharded_parameters(self.model), unused_parameters=selects_tokens(self.model))
            return self.model
        if experts:
            ignore_in_ddp(self.model, experts)
        # Token-selection layers can leave a whole block without tokens in a step; DDP must then not
        # wait for its gradients. Buffers (expert-choice thresholds) follow rank 0, as BatchNorm's do.
        return torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.rt.local_rank] if self.rt.device.type == "cuda" else None,
            find_unused_parameters=selects_tokens(self.model), gradient_as_bucket_view=True)

    def budget_progress(self) -> float:
        """Fraction of the FLOPs or wall-clock budget spent (0 without a budget)."""
        tc = self.cfg.train
        if tc.max_flops:
            return self.total_flops / tc.max_flops
        if tc.max_seconds:
            return self.train_seconds / tc.max_seconds
        return 0.0

    def budget_spent(self) -> bool:
        """True once the next step would end further from the budget than stopping now.
        Equal-FLOPs runs therefore end within half a step of the budget."""
        tc = self.cfg.train
        if tc.max_flops:
            return self.total_flops + 0.5 * self.last_step_flops >= tc.max_flops
        if tc.max_seconds:
            per_step = self.train_seconds / max(1, self.step)
            return self.train_seconds + 0.5 * per_step >= tc.max_seconds
        return False

    def expected_steps(self) -> int:
        """Steps this run will take: train.steps, or fewer when a budget runs out first (an
        estimate from the steps so far, for the progress bar)."""
        tc = self.cfg.train
        if self.step == 0 or not (tc.max_flops or tc.max_seconds):
            return tc.steps
        progress = self.budget_progress()
        return min(tc.steps, max(self.step, round(self.step / max(progress, 1e-9))))

    # -- run folder and resume -------------------------------------------------------------

    def _prepare_run_dir(self, resume) -> dict | None:
        """Check (every rank) and set up (rank 0) the run folder; when resuming, load the weights and
        counters and return the saved training state (optimizer, scheduler) for after the split."""
        existing = ckpt.list_checkpoints(self.run_dir)
        if not resume:
            if existing:
                raise TrainingError(
                    f"run folder {self.run_dir} already has checkpoints (newest {existing[-1].name}); "
                    "pass --resume to continue it, or choose another run_dir (nothing was overwritten)")
            if self.rt.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.metrics.reset()
                (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            self.rt.barrier()
            return None
        if resume is True and not existing:
            # Killed before its first checkpoint: nothing to resume, so start the run afresh.
            if self.rt.is_main:
                print(f"no checkpoint in {self.run_dir} yet; starting from step 0")
            return self._prepare_run_dir(False)
        path = self._usable_checkpoint(existing) if resume is True else ckpt.resolve_checkpoint(resume)
        saved = config_from_saved(ckpt.read_config(path))
        if saved.model != self.cfg.model:
            changed = changed_keys(saved.model.to_dict(), self.cfg.model.to_dict(), "model.")
            raise TrainingError(f"checkpoint {path} was trained with a different model config ({', '.join(changed[:4])}"
                                f"{' ...' if len(changed) > 4 else ''}); resume with the config it was saved with, "
                                "or leave --config out to use the run's own")
        if ckpt.checkpoint_format(path) == "sharded":
            # Weights and optimizer state load into their shards once the model is distributed.
            state = {**torch.load(path / "state.pt", weights_only=True, map_location="cpu"), "sharded": path}
        else:
            state = ckpt.load_checkpoint(path, self.model)
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.total_flops = float(state["total_flops"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.last_step_flops = float(state["last_step_flops"])
        self.total_executed_flops = float(state.get("total_executed_flops", self.total_flops))
        self.last_step_executed_flops = float(state.get("last_step_executed_flops", self.last_step_flops))
        if self.rt.is_main:
            print(f"resuming {self.run_dir} from step {self.step} on {self.rt.world_size} rank(s)")
            self.metrics.truncate_after(self.step)  # those lines will be written again
        self.rt.barrier()
        return state

    def _usable_checkpoint(self, existing: list[Path]) -> Path:
        """The newest checkpoint that passes its integrity check; an older one is used only with a
        message saying which and why (never silently)."""
        errors = []
        for path in reversed(existing):
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointError as e:
                errors.append(str(e))
                continue
            if errors and self.rt.is_main:
                print(f"warning: {'; '.join(errors)}; resuming from the older intact checkpoint {path.name} instead")
            return path
        raise ckpt.CheckpointError(f"no intact checkpoint in {self.run_dir}: {'; '.join(errors)}")

    def save(self) -> Path:
        """Write a checkpoint (every rank calls this): sharded with train.fsdp, every rank its shards;
        else whole, by rank 0 after gathering expert shards."""
        state = {
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "total_flops": self.total_flops,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "last_step_flops": self.last_step_flops,
            "total_executed_flops": self.total_executed_flops,
            "last_step_executed_flops": self.last_step_executed_flops,
            "world_size": self.rt.world_size,
        }
        if self.cfg.train.fsdp:
            return save_sharded(self.run_dir, self.step, self.model, self.optimizer, state, self.cfg.to_dict(),
                                self.rt, keep=self.cfg.train.keep_checkpoints)
        state["optimizer"] = (full_optimizer_state(self.optimizer, self.model) if self.expert_parallel
                              else self.optimizer.state_dict())
        path = ckpt.checkpoint_dir(self.run_dir) / f"step_{self.step:08d}"
        with full_experts(self.model):
            if self.rt.is_main:
                path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.to_dict(),
                                            keep=self.cfg.train.keep_checkpoints)
        self.rt.barrier()  # nobody moves on (or can be killed) believing in a half-written step
        return path

    # -- the loop ---------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if not self.rt.is_main:
            return
        self.metrics.append(record)

    def aux_loss(self, aux_losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        weights = self.cfg.train.aux_loss_weights
        total = 0.0
        for name, value in aux_losses.items():
            if name not in weights:
                raise TrainingError(f"a layer returned aux loss {name!r} but train.aux_loss_weights has no weight "
                                    f"for it; add train.aux_loss_weights.{name}: <weight> (0 to ignore it)")
            total = total + weights[name] * value
        return total

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the step's batch: the global batch depends on (seed, step) only, so any
        number of ranks (and a resume on a different number) trains on the same data."""
        tc = self.cfg.train
        x, y = train_batch(self.corpus.train, step=step, seed=tc.seed, batch_size=tc.batch_size,
                           seq_len=self.cfg.model.seq_len)
        n = self.rt.world_size
        return x.tensor_split(n)[self.rt.rank].to(self.rt.device), y.tensor_split(n)[self.rt.rank].to(self.rt.device)

    def _calibrate_added_parameters(self) -> str | None:
        """Fit the parameters that layers add to a pretrained dense model (SPLA's residual weight) on
        up to 4 windows of step 0's training batch (the same on every rank). Returns a log line, or
        None when no layer calibrates."""
        tc = self.cfg.train
        x, _ = train_batch(self.corpus.train, step=0, seed=tc.seed, batch_size=min(tc.batch_size, 4),
                           seq_len=self.cfg.model.seq_len)
        fitted = calibrate_added_parameters(self.model, x)
        if not fitted:
            return None
        values = torch.cat([v.flatten() for v in fitted.values()])
        return (f"calibrated {len(fitted)} layers' added parameters on {x.numel()} training tokens "
                f"(range {values.min().item():.2f} to {values.max().item():.2f})")

    def train_step(self) -> tuple[float, dict]:
        tc = self.cfg.train
        x, y = self.local_batch(self.step)
        y = scored_from(y, self.loss_from)
        set_training_progress(self.model, max(self.step / tc.steps, self.budget_progress()))
        if self.fsdp:
            sync_buffers(self.model, self.rt)  # what DDP does at each forward
        count = self.step % tc.flops_every == 0
        counter = flop_counter() if count else contextlib.nullcontext()
        recomputed = count_recomputed_flops() if count else contextlib.nullcontext([])
        with counter, recomputed as recomputed_flops:
            with autocast(tc.precision, self.rt.device.type):
                try:
                    out = self.train_model(x)
                except RoutingError as e:  # a router met NaN/inf scores: the same clean stop as a NaN loss
                    raise TrainingError(self._diverged(f"a router's scores became NaN or inf ({e})")) from None
                loss = lm_loss(out.logits, y)
                total = loss + self.aux_loss(out.aux_losses)
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(x).logits
                    kl = distill_loss(out.logits, teacher_logits, y)
                    total = total + tc.distill * kl
            total.backward()  # DDP averages the replicated gradients over ranks here
        if self.expert_parallel:
            reduce_expert_grads(self.model, self.rt)
        if count:  # all ranks' FLOPs
            self.last_step_executed_flops = self.rt.all_reduce(float(counter.get_total_flops()))
            self.last_step_flops = self.last_step_executed_flops - self.rt.all_reduce(sum(recomputed_flops))
        if self.rt.all_reduce(float(not torch.isfinite(total).item()), "max"):
            raise TrainingError(self._diverged(f"the loss became {total.item()}"))
        grad_norm = None
        if tc.grad_clip is not None:
            if self.fsdp:
                grad_norm = clip_grad_norm_sharded(self.model, tc.grad_clip, self.rt).item()
            elif self.expert_parallel:
                grad_norm = clip_grad_norm(self.model, tc.grad_clip, self.rt).item()
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = self.rt.all_reduce(loss.item(), "mean")  # the loss of the whole batch
        if tc.low_memory:
            release_free_memory()  # the step's freed activations go back to the system, not into heap holes
        record = {"loss": mean_loss, "lr": self.scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        for name, value in out.aux_losses.items():
            record[f"aux.{name}"] = float(value.detach())
        if self.teacher is not None:
            record["distill_kl"] = float(kl.detach())
        record.update(_scalar_metrics(out.metrics))  # routing metrics of rank 0's share
        return mean_loss, record

    def _memory_record(self) -> dict[str, float]:
        """Per-rank memory for the metrics: training state (largest rank's) and peak resident memory of
        the process (and of the GPU) so far, the largest over ranks."""
        record = {f"memory.{k}": v for k, v in self.state_memory.items()}
        record["memory.peak_rss_gib"] = self.rt.all_reduce(peak_rss_bytes() / GIB, "max")
        if self.rt.device.type == "cuda":
            record["memory.peak_gpu_gib"] = self.rt.all_reduce(torch.cuda.max_memory_allocated(self.rt.device) / GIB,
                                                               "max")
        return record

    def _evaluate_and_log(self, bar=None) -> float:
        """Validation bits/byte now, logged with the step and counters; returns it."""
        tc = self.cfg.train
        val = evaluate_split(self.model, self.corpus.val, batch_size=tc.batch_size, max_batches=tc.eval_batches,
                             precision=tc.precision, rt=self.rt, token_bytes=self.corpus.bytes_of("val"),
                             from_position=max(self.loss_from, tc.eval_from))
        record = {"step": self.step, "val_bpb": val["bpb"], "total_flops": self.total_flops,
                  "tokens": self.tokens_seen, "train_seconds": self.train_seconds}
        if self.tokenizer is not None:
            record["val_token_ppl"] = math.exp(val["nll"])
        self._log(record)
        if self.rt.is_main:
            (bar.write if bar is not None else print)(f"step {self.step}: val {val['bpb']:.4f} bits/byte")
        return val["bpb"]

    def _diverged(self, what: str) -> str:
        """The message for a run that diverged at this step, true to what is on disk."""
        saved = ckpt.list_checkpoints(self.run_dir)
        fix = "lower train.lr" + (" or enable train.grad_clip" if self.cfg.train.grad_clip is None else "")
        where = (f"the last checkpoint, {saved[-1]}, is intact: {fix} and resume from it with --resume" if saved
                 else f"no checkpoint was written yet: {fix} and start again")
        return f"{what} at step {self.step + 1}; training stopped before updating the weights, and {where}"

    def train(self, until: int | None = None) -> TrainResult:
        """Train to ``train.steps`` or until the budget (train.max_flops / max_seconds) is spent; or stop
        early after step ``until``, checkpointing there."""
        try:
            with StopRequest() as stop:
                return self._train(until, stop)
        except RuntimeError as e:
            if not (self.rt.distributed and lost_peer(e)):
                raise
            saved = ckpt.list_checkpoints(self.run_dir)
            last = f"the last complete checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
            detail = " ".join(str(e).split())
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            raise DistributedError(
                f"rank {self.rt.rank} of {self.rt.world_size}: another rank stopped answering during step "
                f"{self.step + 1} ({detail}); {last}. Fix what stopped that rank (its log says why) and launch "
                "the same command again with --resume; torchrun --max-restarts N ... --resume does that "
                "automatically") from e
        finally:
            self.lock.release()

    def _train(self, until: int | None, stop_request: StopRequest | None = None) -> TrainResult:
        tc = self.cfg.train
        stop = tc.steps if until is None else min(until, tc.steps)
        self.model.train()
        losses: list[float] = []
        val_bpb = None
        tokens_per_step = tc.batch_size * self.cfg.model.seq_len
        bar = tqdm(total=self.expected_steps(), initial=self.step, disable=not (tc.progress and self.rt.is_main),
                   unit="step", dynamic_ncols=True, mininterval=1.0, desc=self.run_dir.name)
        last_ckpt = None
        window_start, window_tokens = time.perf_counter(), 0
        finished = self.step >= tc.steps or (self.step > 0 and self.budget_spent())
        if self.step == 0 and self.cfg.model.init and not finished:
            # A run from pretrained (or converted) weights: its starting point is a result too (an
            # upcycled model must start where the dense one ended).
            val_bpb = self._evaluate_and_log()
        while self.step < stop and not finished:
            t0 = time.perf_counter()
            loss, record = self.train_step()
            # The slowest rank's time, so every rank takes the same budget decisions.
            dt = self.rt.all_reduce(time.perf_counter() - t0, "max")
            self.step += 1
            self.train_seconds += dt
            self.tokens_seen += tokens_per_step
            self.total_flops += self.last_step_flops
            self.total_executed_flops += self.last_step_executed_flops
            window_tokens += tokens_per_step
            losses.append(loss)
            finished = self.step >= tc.steps or self.budget_spent()
            if self.step % tc.log_every == 0 or finished:
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
                window_start, window_tokens = time.perf_counter(), 0
                self._log({"step": self.step, **record, "tokens_per_s": tok_s, "step_flops": self.last_step_flops,
                           "total_flops": self.total_flops, "executed_step_flops": self.last_step_executed_flops,
                           "total_executed_flops": self.total_executed_flops, "tokens": self.tokens_seen,
                           "train_seconds": self.train_seconds, **self._memory_record()})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if self.step % tc.eval_every == 0 or finished:
                val_bpb = self._evaluate_and_log(bar)
            if self.step % tc.checkpoint_every == 0 or self.step == stop or finished:
                last_ckpt = self.save()
            if bar.total != (expected := self.expected_steps()):
                bar.total = expected
            bar.update(1)
            if stop_request is not None and self.rt.all_reduce(float(stop_request.requested), "max") and not finished:
                bar.close()
                path = last_ckpt if last_ckpt is not None and last_ckpt.name.endswith(f"{self.step:08d}") \
                    else self.save()
                raise TrainingInterrupted(
                    f"stopped by {stop_request.name or 'a signal on another rank'} after step {self.step}; "
                    f"checkpoint {path} saved. Resume with the same command and --resume")
        bar.close()
        return TrainResult(self.run_dir, self.step, val_bpb, losses, self.total_flops, last_ckpt)
