"""Models built from condcomp layers."""

from condcomp.layers.blocks import TransformerBlock
from condcomp.models.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer", "TransformerBlock"]
