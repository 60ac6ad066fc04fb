"""Models built from condcomp layers."""

from condcomp.models.transformer import ModelOutput, Transformer, TransformerBlock

__all__ = ["ModelOutput", "Transformer", "TransformerBlock"]
