"""Drop-in PyTorch layers. Each returns ``(y, LayerInfo)`` and declares its traits
(``condcomp.layers.traits``): causal, selects_tokens, aux_loss_names, routed_parameters."""

from condcomp.layers.attention import Attention
from condcomp.layers.attention_experts import AttentionExperts
from condcomp.layers.blocks import ParallelBlock, RecurrentBlock, TransformerBlock
from condcomp.layers.conditional import ConditionalAttention, ConditionalFeedForward, colt5_router
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache, ModelCache
from condcomp.layers.local_attention import LocalAttention
from condcomp.layers.moe import MoE
from condcomp.layers.norm import RMSNorm
from condcomp.layers.prunable_ffn import PrunableFeedForward
from condcomp.layers.rotary import Rotary
from condcomp.layers.selected_block import LayerSkip, MixtureOfDepths, SelectedBlock
from condcomp.layers.sparse_linear_attention import SparseLinearAttention
from condcomp.layers.sru import SRU, SRULayer, SRUpp, SRUppAttention
from condcomp.layers.traits import ConditionalLayer, RoutedParameters

__all__ = ["Attention", "AttentionExperts", "ConditionalAttention", "ConditionalFeedForward", "ConditionalLayer", "FeedForward",
           "KVCache", "LayerInfo", "LayerSkip", "LocalAttention", "MixtureOfDepths", "MoE", "ModelCache", "ParallelBlock", "PrunableFeedForward", "RMSNorm",
           "RecurrentBlock", "Rotary", "RoutedParameters", "SRU", "SRULayer", "SRUpp", "SRUppAttention",
           "SelectedBlock", "SparseLinearAttention", "TransformerBlock", "colt5_router"]
