"""Converters: pretrained Hugging Face encoders -> conditional-computation models (CoDA),
Llama-family decoders in and out (``from_hf``, ``to_hf``), and dense models -> smaller dense models
with pruned FFN channels (``prune_ffn_channels``)."""

from condcomp.convert.coda import (METHODS, AdapterLayer, CodaClassifier, CodaConfig, CodaLayer, ConvertError,
                                   ParallelAdapter, convert)
from condcomp.convert.pretrained import DEFAULT_MODEL, PACKAGED_MODELS, PretrainedError, load_encoder, model_path
from condcomp.convert.hf import from_hf, to_hf
from condcomp.convert.prune import PruneError, magnitude_masks, prune_ffn_channels
from condcomp.convert.saved import load_converted, save_converted
from condcomp.convert.upcycle import upcycle

__all__ = ["METHODS", "AdapterLayer", "CodaClassifier", "CodaConfig", "CodaLayer", "ConvertError", "DEFAULT_MODEL",
           "PACKAGED_MODELS", "ParallelAdapter", "PretrainedError", "PruneError", "convert", "from_hf", "load_converted",
           "load_encoder", "magnitude_masks", "model_path", "prune_ffn_channels", "save_converted", "to_hf", "upcycle"]
