"""Moving tokens by index: the shared dispatch path and its reference twins."""

from condcomp.dispatch.grouped import WeightedScatter, dispatch, dispatch_reference, weighted_scatter_reference
from condcomp.dispatch.sequences import (SequencePack, dispatch_sequences, dispatch_sequences_reference, gather_pack,
                                         pack_sequences, scatter_pack)

__all__ = ["SequencePack", "WeightedScatter", "dispatch", "dispatch_reference", "dispatch_sequences",
           "dispatch_sequences_reference", "gather_pack", "pack_sequences", "scatter_pack",
           "weighted_scatter_reference"]
