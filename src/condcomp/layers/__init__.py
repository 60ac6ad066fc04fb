"""Drop-in PyTorch layers."""

from condcomp.layers.attention import Attention
from condcomp.layers.conditional import ConditionalAttention, ConditionalFeedForward
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache, ModelCache
from condcomp.layers.local_attention import LocalAttention
from condcomp.layers.moe import MoE
from condcomp.layers.norm import RMSNorm
from condcomp.layers.rotary import Rotary
from condcomp.layers.selected_block import LayerSkip, MixtureOfDepths
from condcomp.layers.sru import SRU, SRULayer, SRUpp, SRUppAttention

__all__ = ["Attention", "ConditionalAttention", "ConditionalFeedForward", "FeedForward", "KVCache", "LayerInfo",
           "LayerSkip", "LocalAttention", "MixtureOfDepths", "MoE", "ModelCache", "RMSNorm", "Rotary",
           "SRU", "SRULayer", "SRUpp", "SRUppAttention"]
