"""Converted models on disk: safetensors weights + JSON configs + tokenizer files.

A folder holds ``model.safetensors`` (every weight, pretrained ones included, so it needs nothing
else), ``coda.json`` (the CodaConfig and the base model's Hugging Face config), the tokenizer, and
``manifest.json`` (SHA-256 and size of the weights and coda.json, as LM checkpoints have). Loading
checks the manifest, then builds the modules from the JSON and fills them from safetensors: no
pickle, no code runs, and a flipped byte or a truncated file is refused by name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from condcomp.convert.coda import CodaClassifier, CodaConfig, ConvertError, convert
from condcomp.files import sha256_file

WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "coda.json", "manifest.json"




def save_converted(model: CodaClassifier, folder: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (and tokenizer) to ``folder``; each file appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"coda": model.config.to_dict(), "base_config": model.base_config.to_dict(), "extra": extra or {}}
    _atomic(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    _atomic(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    manifest = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                for name in (WEIGHTS, CONFIG)}
    _atomic(folder / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved model is meant to be shared
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def verify_folder(folder: str | Path) -> None:
    """Check the weights and coda.json against manifest.json (folders saved before manifests existed
    have none and are read as they are)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConvertError(f"{path} is corrupted (not JSON); save the model again") from None
    for name, entry in manifest.items():
        f = folder / name
        if not f.is_file():
            raise ConvertError(f"{folder} is incomplete: {name} is missing")
        if f.stat().st_size != entry["bytes"]:
            raise ConvertError(f"{f} has {f.stat().st_size} bytes, expected {entry['bytes']} (truncated?)")
        if sha256_file(f) != entry["sha256"]:
            raise ConvertError(f"{f} does not match its SHA-256 in {MANIFEST}: the file is corrupted")


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConvertError(f"{folder} is not a converted model folder: {CONFIG} is missing "
                           "(make one with `condcomp coda train --out FOLDER`)")
    verify_folder(folder)
    try:
        meta = json.loads(path.read_text())
        meta["coda"], meta["base_config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConvertError(f"{path} is corrupted or not a condcomp model description ({e}); save the model again") from None
    return meta


def load_converted(folder: str | Path, *, with_tokenizer: bool = True):
    """-> (CodaClassifier in eval mode, tokenizer or None, meta dict). Inference needs nothing else."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    meta = read_meta(folder)
    base = BertModel(BertConfig.from_dict(meta["base_config"]), add_pooling_layer=False)
    model = convert(base, CodaConfig.from_dict(meta["coda"]))
    if not (folder / WEIGHTS).is_file():
        raise ConvertError(f"{folder / WEIGHTS} is missing; the folder is incomplete")
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ConvertError(f"{folder / WEIGHTS} cannot be read ({' '.join(str(e).split())[:200]})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConvertError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if with_tokenizer else None
    return model.eval(), tokenizer, meta


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two models hold identical tensors under identical names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
