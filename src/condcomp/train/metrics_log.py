"""The metrics log: one JSON object per line (``metrics.jsonl``), written by the trainers and read by
the comparison report. One writer and one reader, so every consumer agrees on what a cut line means.

    log = MetricsLog(run_dir / "metrics.jsonl")
    log.append({"step": 10, "loss": 3.2})
    records = log.read()             # stops at a line cut by a crash
    log.truncate_after(step=200)     # resuming from step 200: later lines will be written again
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def reset(self) -> None:
        """Start an empty log (a new run)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def append(self, record: dict) -> None:
        """Add one record; each line is flushed whole, so a crash cuts at most the last line. A
        non-finite number is written as null: JSON has no NaN or Infinity, and readers must parse it."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_finite(record), allow_nan=False) + "\n")

    def read(self) -> list[dict]:
        """Every complete record in order; reading stops at a line cut by a crash."""
        out = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: nothing after it is trustworthy
        return out

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (atomically: the log is replaced, never half-written)."""
        if not self.path.is_file():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
