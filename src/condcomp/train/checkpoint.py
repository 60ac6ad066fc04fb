"""Atomic, verifiable checkpoints.

A checkpoint is a folder ``<run_dir>/checkpoints/step_00000100/`` holding
- ``model.safetensors``: the weights (safetensors: loading never executes code);
- ``state.pt``: optimizer, schedule, RNG and counters, plain tensors and containers, loaded with
  ``torch.load(weights_only=True)``;
- ``config.json``: the run config, so the model can be rebuilt without the training code;
- ``manifest.json``: SHA-256 and size of each file above, written last.

That is the *whole* format. A *sharded* checkpoint (``train.fsdp``, ``condcomp.train.sharded_checkpoint``)
holds, instead of model.safetensors and the optimizer, the files ``torch.distributed.checkpoint`` wrote
(one per rank, ``.metadata``); its manifest says ``"format": "sharded"`` and covers them too.

It is written into a temporary sibling folder and renamed into place, so a crash (even SIGKILL)
leaves either the complete checkpoint or none. Loading verifies the manifest first, so a truncated
or altered file fails with a clear error instead of loading garbage.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from condcomp.files import sha256_file

_NAME = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "state.pt", "config.json")
REQUIRED = {"whole": FILES, "sharded": ("state.pt", "config.json", ".metadata")}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names it and what to do."""




def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders of a run, oldest first (temporary folders ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name))


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict, config: dict,
                    *, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints. Returns its folder."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f"step_{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    return publish_checkpoint(run_dir, tmp, step, fmt="whole", keep=keep)


def publish_checkpoint(run_dir: str | Path, tmp: Path, step: int, *, fmt: str, keep: int) -> Path:
    """Make the complete checkpoint in folder ``tmp`` visible as step ``step``: write its manifest
    (every file's SHA-256 and size), fsync, rename into place, and keep the newest ``keep``."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step_{step:08d}"
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in names:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {"step": step, "format": fmt,
                "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                          for name in names}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        # Re-saving a step (e.g. after resuming from it): move the old copy aside, never half-replace it.
        old = folder / f"step_{step:08d}.tmp-old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against the manifest. Returns the manifest; raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable manifest.json ({e})") from None
    fmt = manifest.get("format", "whole")
    if fmt not in REQUIRED:
        raise CheckpointError(f"checkpoint {path} has an unknown format {fmt!r} in manifest.json; was it written by "
                              "a newer condcomp?")
    for name in sorted(set(REQUIRED[fmt]) | set(entries)):
        f = path / name
        if name not in entries or not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = f.stat().st_size
        if size != entries[name]["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {size} bytes, expected "
                                  f"{entries[name]['bytes']} (truncated?)")
        if sha256_file(f) != entries[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match its SHA-256 in manifest.json")
    return manifest


def checkpoint_format(path: str | Path) -> str:
    """ "whole" or "sharded" (verifies the checkpoint)."""
    return verify_checkpoint(path).get("format", "whole")


def read_config(path: str | Path) -> dict:
    verify_checkpoint(path)
    return json.loads((Path(path) / "config.json").read_text())


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Verify, load weights into ``model`` (strict; a whole single-process model), and return the
    training state dict (a sharded checkpoint's holds no optimizer: ``sharded_checkpoint.load_sharded``)."""
    path = Path(path)
    if checkpoint_format(path) == "sharded":
        load_sharded_weights(path, model)
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}; was it saved with a different config?")
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")  # e.g. saved by GPU ranks


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint of either format, whole, by name (verifies it first)."""
    path = Path(path)
    if checkpoint_format(path) == "sharded":
        return read_sharded_weights(path)
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / "manifest.json").exists() or _NAME.match(path.name):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}; pass a run folder that has "
                              f"checkpoints/step_* or a checkpoint folder itself")
    return found[-1]


# -- sharded checkpoints, read whole in one process (written by condcomp.train.sharded_checkpoint) ---

@contextlib.contextmanager
def quiet_single_process(distributed: bool):
    """DCP warns that it assumes a single process even when told so (no_dist=True): say nothing then."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def load_sharded_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load a sharded checkpoint's weights into a whole model in this one process (evaluation,
    sampling, export, consolidation): every shard is read."""
    import torch.distributed.checkpoint as dcp

    weights = {"model": model.state_dict()}
    with quiet_single_process(False):
        dcp.load(weights, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    model.load_state_dict(weights["model"])


def read_sharded_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint, whole, by name (the model rebuilt from its config)."""
    from condcomp.config import config_from_saved
    from condcomp.models import Transformer

    cfg = config_from_saved(json.loads((Path(path) / "config.json").read_text()))
    model = Transformer(cfg.model)
    load_sharded_weights(path, model)
    return model.state_dict()
