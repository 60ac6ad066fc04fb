"""Converted models on disk: safetensors weights + JSON configs + tokenizer files.

A folder holds ``model.safetensors`` (every weight, pretrained ones included, so it needs nothing
else), ``coda.json`` (the CodaConfig and the base model's Hugging Face config) and the tokenizer.
Loading builds the modules from the JSON and fills them from safetensors: no pickle, no code runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from condcomp.convert.coda import CodaClassifier, CodaConfig, ConvertError, convert

WEIGHTS, CONFIG = "model.safetensors", "coda.json"


def save_converted(model: CodaClassifier, folder: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write the model (and tokenizer) to ``folder``; each file appears whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"coda": model.config.to_dict(), "base_config": model.base_config.to_dict(), "extra": extra or {}}
    _atomic(folder / WEIGHTS, lambda p: save_file(state, str(p)))
    _atomic(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
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


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ConvertError(f"{folder} is not a converted model folder: {CONFIG} is missing "
                           "(make one with `condcomp coda train --out FOLDER`)")
    return json.loads(path.read_text())


def load_converted(folder: str | Path, *, with_tokenizer: bool = True):
    """-> (CodaClassifier in eval mode, tokenizer or None, meta dict). Inference needs nothing else."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    meta = read_meta(folder)
    base = BertModel(BertConfig.from_dict(meta["base_config"]), add_pooling_layer=False)
    model = convert(base, CodaConfig.from_dict(meta["coda"]))
    if not (folder / WEIGHTS).is_file():
        raise ConvertError(f"{folder / WEIGHTS} is missing; the folder is incomplete")
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConvertError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True) if with_tokenizer else None
    return model.eval(), tokenizer, meta


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two models hold identical tensors under identical names."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
