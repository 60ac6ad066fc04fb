"""Starting a run from pretrained weights: ``model.init`` (``condcomp train --init``).

``model.init`` names a Hugging Face model folder, a packaged model ("smollm2") or a condcomp run or
checkpoint folder. ``resolve_init`` fills the model's shape from it before the config is validated
(a shape key the user set to another value is an error naming the key); ``load_init_weights`` copies
the weights into the built model. Techniques that wrap the dense blocks (MoD, skip) start from the
pretrained blocks, with fresh routers; ``data.tokenizer`` defaults to the pretrained model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from condcomp import registry
from condcomp.config import ModelConfig, config_from_saved
from condcomp.convert.coda import ConvertError
from condcomp.convert.hf import load_dense_state, model_config_from_hf, pretrained_folder
from condcomp.convert.pretrained import PretrainedError
from condcomp.models import Transformer
from condcomp.settings import ConfigError, from_dict
from condcomp.train import checkpoint as ckpt

# Keys that fix the weights' shapes and meaning: taken from the pretrained model.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "norm_eps",
              "rope_base", "rope_scaling", "tie_embeddings", "qkv_bias", "out_bias")


def _checkpoint(init: str):
    """The resolved condcomp checkpoint folder if ``init`` is a condcomp run or checkpoint, else None."""
    path = Path(init)
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "manifest.json").is_file()):
        return ckpt.resolve_checkpoint(path)
    return None


def _hf_folder(init: str) -> tuple[Path, str | None]:
    return pretrained_folder(init, also=" or a condcomp run or checkpoint folder")


def pretrained_model_section(init: str) -> dict:
    """The ``model`` settings of the pretrained model named by ``init`` (no weights are read)."""
    saved = _checkpoint(init)
    if saved is not None:
        return dict(ckpt.read_config(saved)["model"])
    from transformers import AutoConfig

    folder, gguf = _hf_folder(init)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedError(f"could not read the model config in {folder}: {' '.join(str(e).split())[:300]}") from None
    return model_config_from_hf(config)


def resolve_init(raw: dict) -> dict:
    """A raw run-config mapping with the model's shape filled from ``model.init`` (unchanged without
    one). The user's technique choices (block, attention, ffn and their sections), seq_len and
    training settings are kept; seq_len may not exceed the pretrained model's."""
    model = raw.get("model") or {}
    init = model.get("init")
    if not init:
        return raw
    pretrained = pretrained_model_section(str(init))
    out = dict(raw)
    merged = dict(model)
    for key in SHAPE_KEYS:
        if key not in pretrained:
            continue
        if key in model and model[key] != pretrained[key] and not (key == "rope_scaling" and _same_scaling(
                model[key], pretrained[key])):
            raise ConfigError(f"model.{key}: {model[key]!r} conflicts with the pretrained model's {pretrained[key]!r} "
                              f"(model.init: {init}); remove model.{key} from the config")
        merged[key] = pretrained[key]
    if "seq_len" in model and model["seq_len"] > pretrained["seq_len"]:
        raise ConfigError(f"model.seq_len: {model['seq_len']} exceeds the pretrained model's "
                          f"{pretrained['seq_len']} (model.init: {init})")
    if "seq_len" not in model and "seq_len" in pretrained:
        # The usual default, but never longer than the pretrained model's context.
        merged["seq_len"] = min(pretrained["seq_len"], ModelConfig().seq_len)
    # A pretrained MoE, attention-expert or parallel-block model stays one unless the config says
    # otherwise: its techniques and their settings come along like its shape.
    for key in ("block", "attention", "ffn", *registry.sections()):
        if key in pretrained and key not in model:
            merged[key] = pretrained[key]
        elif isinstance(pretrained.get(key), dict) and isinstance(model.get(key), dict):
            merged[key] = {**pretrained[key], **model[key]}  # a section: the settings given override the rest
    out["model"] = merged
    data = dict(raw.get("data") or {})
    if data.get("tokenizer") is None and _checkpoint(str(init)) is None:
        data["tokenizer"] = str(init)
    elif data.get("tokenizer") is None:
        data["tokenizer"] = ckpt.read_config(_checkpoint(str(init)))["data"].get("tokenizer") or "bytes"
    out["data"] = data
    return out


def _same_scaling(a, b) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and {**b, **a} == b


def load_run_config(path=None, overrides: list[str] | None = None):
    """``condcomp.config.load_config`` with ``model.init`` resolved: read YAML, apply overrides, fill
    the pretrained shape, validate."""
    from condcomp.config import RunConfig, read_run_yaml

    return from_dict(RunConfig, resolve_init(read_run_yaml(path, overrides)))


def load_init_weights(model, init: str) -> str:
    """Copy the weights named by ``init`` into ``model`` (built from a config ``resolve_init`` filled).
    Returns a one-line description for the log."""
    saved = _checkpoint(init)
    if saved is not None:
        state = ckpt.read_weights(saved)  # whole or sharded (train.fsdp), verified
        load_dense_state(model, {k: v.to(next(model.parameters()).dtype) for k, v in state.items()},
                         what=f"checkpoint {saved}")
        return f"initialised from condcomp checkpoint {saved}"
    from condcomp.convert.hf import hf_to_condcomp, load_hf_model

    hf, _, description = load_hf_model(init, torch.float32)
    state = hf_to_condcomp(hf.state_dict(), n_layers=model.cfg.n_layers, moe=model.cfg.ffn == "moe")
    dtype = next(model.parameters()).dtype
    load_dense_state(model, {k: v.to(dtype) for k, v in state.items()}, what=description)
    return f"initialised from {description}"


def load_tokenizer(name: str):
    """A fast Hugging Face tokenizer from a folder or a packaged model name."""
    from transformers import AutoTokenizer

    path = Path(name)
    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        folder, gguf = path, None
    else:
        folder, gguf = _hf_folder(name)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedError(f"could not load a tokenizer from {folder}: {' '.join(str(e).split())[:300]}") from None


def check_tokenizer_fits(tokenizer, vocab_size: int, name: str) -> None:
    if len(tokenizer) > vocab_size:
        raise ConvertError(f"the tokenizer {name} has {len(tokenizer)} tokens but model.vocab_size is {vocab_size}; "
                           f"set model.vocab_size >= {len(tokenizer)} (or use the tokenizer the model was trained with)")


def run_tokenizer(data_cfg):
    """(name, tokenizer) of a run's data: ("bytes", None) for byte-level text."""
    name = data_cfg.tokenizer or "bytes"
    if name == "bytes":
        return name, None
    return name, load_tokenizer(name)


def load_run_corpus(cfg):
    """The run's corpus (byte-level, or tokenized with ``data.tokenizer``) and its tokenizer (or None),
    checked against the model's vocabulary."""
    from condcomp.data import load_corpus
    from condcomp.data.tokenized import tokenize_corpus

    d = cfg.data
    corpus = load_corpus(d.source, val_fraction=d.val_fraction, test_fraction=d.test_fraction, cache_dir=d.cache_dir)
    name, tokenizer = run_tokenizer(d)
    if tokenizer is None:
        if cfg.model.vocab_size < 256:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the 256 byte values of "
                              "byte-level text; use 256 (or set data.tokenizer)")
        return corpus, None
    check_tokenizer_fits(tokenizer, cfg.model.vocab_size, name)
    return tokenize_corpus(corpus, tokenizer, name=name, cache_dir=d.cache_dir), tokenizer


def save_imported(model, tokenizer, out, *, source: str):
    """Write an imported model as a condcomp run folder (one checkpoint at step 0, the tokenizer in
    ``<out>/tokenizer``), so ``condcomp sample``, ``eval``, ``export`` and ``train --init`` take it."""
    from condcomp.config import DataConfig, RunConfig

    out = Path(out)
    if ckpt.list_checkpoints(out):
        raise ConfigError(f"{out} already holds a condcomp run; choose a new folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_name = "bytes"
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "tokenizer")
        tokenizer_name = str((out / "tokenizer").resolve())
    cfg = RunConfig(model=model.cfg, data=DataConfig(tokenizer=tokenizer_name), run_dir=str(out))
    cfg.model.init = None
    return ckpt.save_checkpoint(out, 0, model, {"step": 0, "imported_from": source}, cfg.to_dict())


def load_model(path: str | Path):
    """(model in eval mode, RunConfig) rebuilt from a checkpoint or a run folder's newest one."""
    path = ckpt.resolve_checkpoint(path)
    cfg = config_from_saved(ckpt.read_config(path))
    model = Transformer(cfg.model)
    ckpt.load_checkpoint(path, model)
    return model.eval(), cfg


def load_model_source(source: str, *, seq_len: int | None = None):
    """(model in eval mode, tokenizer or None) of a condcomp run or checkpoint folder, a Hugging Face
    decoder folder or a packaged decoder name (smollm2); seq_len caps a Hugging Face model's context."""
    saved = _checkpoint(str(source))
    if saved is not None:
        model, cfg = load_model(saved)
        return model, run_tokenizer(cfg.data)[1]
    from condcomp.convert.hf import from_hf

    return from_hf(source, seq_len=seq_len)
