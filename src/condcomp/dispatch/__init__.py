"""Moving tokens by index: the shared dispatch path and its reference twin."""

from condcomp.dispatch.grouped import WeightedScatter, dispatch, dispatch_reference, weighted_scatter_reference

__all__ = ["WeightedScatter", "dispatch", "dispatch_reference", "weighted_scatter_reference"]
