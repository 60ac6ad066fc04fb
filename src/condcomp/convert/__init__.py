"""Converters: pretrained Hugging Face encoders -> conditional-computation models (CoDA)."""

from condcomp.convert.coda import (METHODS, AdapterLayer, CodaClassifier, CodaConfig, CodaLayer, ConvertError,
                                   ParallelAdapter, convert)
from condcomp.convert.pretrained import DEFAULT_MODEL, PACKAGED_MODELS, PretrainedError, load_encoder, model_path
from condcomp.convert.saved import load_converted, save_converted

__all__ = ["METHODS", "AdapterLayer", "CodaClassifier", "CodaConfig", "CodaLayer", "ConvertError", "DEFAULT_MODEL",
           "PACKAGED_MODELS", "ParallelAdapter", "PretrainedError", "convert", "load_converted", "load_encoder",
           "model_path", "save_converted"]
