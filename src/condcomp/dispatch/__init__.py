"""Moving tokens by index: the shared dispatch path and its reference twin."""

from condcomp.dispatch.grouped import dispatch, dispatch_reference

__all__ = ["dispatch", "dispatch_reference"]
