"""Atomic, verifiable checkpoints.

A checkpoint is a folder ``<run_dir>/checkpoints/step_00000100/`` holding
- ``model.safetensors``: the weights (safetensors: loading never executes code);
- ``state.pt``: optimizer, schedule, RNG and counters, plain tensors and containers, loaded with
  ``torch.load(weights_only=True)``;
- ``config.json``: the run config, so the model can be rebuilt without the training code;
- ``manifest.json``: SHA-256 and size of each file above, written last.

It is written into a temporary sibling folder and renamed into place, so a crash (even SIGKILL)
leaves either the complete checkpoint or none. Loading verifies the manifest first, so a truncated
or altered file fails with a clear error instead of loading garbage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from condcomp.files import sha256_file

_NAME = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "state.pt", "config.json")


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
    final = folder / f"step_{step:08d}"
    tmp = folder / f"step_{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    manifest = {"step": step, "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                                        for name in FILES}}
    for name in FILES:
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
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
    for name in FILES:
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


def read_config(path: str | Path) -> dict:
    verify_checkpoint(path)
    return json.loads((Path(path) / "config.json").read_text())


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Verify, load weights into ``model`` (strict), and return the training state dict."""
    path = Path(path)
    verify_checkpoint(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}; was it saved with a different config?")
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")  # e.g. saved by GPU ranks


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
