"""Drop-in PyTorch layers."""

from condcomp.layers.attention import Attention
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.layers.norm import RMSNorm
from condcomp.layers.rotary import Rotary

__all__ = ["Attention", "FeedForward", "LayerInfo", "RMSNorm", "Rotary"]
