"""Training and evaluation batches of byte windows.

The training batch of step s is a pure function of (seed, s): resuming at step s reproduces exactly
the batches an uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import numpy as np
import torch


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids: [len]."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    """Token ids (bytes) -> text; bytes that are not valid UTF-8 become U+FFFD."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(data[s : s + length]) for s in starts]).astype(np.int64))


def train_batch(data: np.ndarray, *, step: int, seed: int, batch_size: int, seq_len: int):
    """Random windows for training step ``step``. Returns (inputs, targets): [batch, seq_len] int64."""
    if len(data) < seq_len + 1:
        raise ValueError(f"training split has {len(data)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use more data or a smaller model.seq_len")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)
    w = _windows(data, starts, seq_len + 1)
    return w[:, :-1], w[:, 1:]


def eval_starts(n: int, *, batch_size: int, seq_len: int, max_batches: int) -> np.ndarray:
    """Start offsets of the fixed, evenly spaced evaluation windows of a split of n tokens."""
    n_windows = (n - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"evaluation split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use more data, a larger data.val_fraction, or a smaller model.seq_len")
    total = min(n_windows, batch_size * max_batches)
    # Spread the windows over the whole split rather than reading only its beginning.
    return (np.linspace(0, n_windows - 1, total).round().astype(np.int64)) * seq_len


def eval_batches(data: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int,
                 token_bytes: np.ndarray | None = None):
    """Fixed, evenly spaced windows across a split (the same every call): yields (inputs, targets),
    both [batch, seq_len] int64; with ``token_bytes`` (bytes of text per token, [n]) also the bytes
    of each target, [batch, seq_len] int64."""
    starts = eval_starts(len(data), batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    for i in range(0, len(starts), batch_size):
        w = _windows(data, starts[i : i + batch_size], seq_len + 1)
        if token_bytes is None:
            yield w[:, :-1], w[:, 1:]
        else:
            yield w[:, :-1], w[:, 1:], _windows(token_bytes, starts[i : i + batch_size] + 1, seq_len)
