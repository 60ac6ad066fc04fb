"""Converters: pretrained Hugging Face encoders -> conditional-computation models (CoDA), and
Llama-family decoders in and out (``from_hf``, ``to_hf``)."""

from condcomp.convert.coda import (METHODS, AdapterLayer, CodaClassifier, CodaConfig, CodaLayer, ConvertError,
                                   ParallelAdapter, convert)
from condcomp.convert.pretrained import DEFAULT_MODEL, PACKAGED_MODELS, PretrainedError, load_encoder, model_path
from condcomp.convert.hf import from_hf, to_hf
from condcomp.convert.saved import load_converted, save_converted
from condcomp.convert.upcycle import upcycle

__all__ = ["METHODS", "AdapterLayer", "CodaClassifier", "CodaConfig", "CodaLayer", "ConvertError", "DEFAULT_MODEL",
           "PACKAGED_MODELS", "ParallelAdapter", "PretrainedError", "convert", "from_hf", "load_converted",
           "load_encoder", "model_path", "save_converted", "to_hf", "upcycle"]
