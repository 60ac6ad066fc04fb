"""The retrieval package's user error."""

from __future__ import annotations


class RetrievalError(ValueError):
    """Bad retrieval input (an empty query, a mismatched or damaged index); the message says what to do."""
