"""The data layer's one error type."""


class DataError(ValueError):
    """The data source cannot be used; the message says which path and what to do."""
