"""CPU inference speed of CoDA models against the dense pretrained encoder (``condcomp coda bench``).

Every model in one table shares the same frozen pretrained weights and the same random inputs
(all tokens real: the worst case for the dense model's padding-free baseline is none). Speed does
not depend on training: a CoDA layer always computes k = ceil(n / r) tokens, so untrained routers
are timed. Rows are timed alternately, one call each per round, and the median is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condcomp.bench.measure import timed_alternating
from condcomp.convert import convert, load_encoder
from condcomp.train.optim import autocast


@dataclass
class SpeedRow:
    model: str          # "dense", "adapter" or "coda r=4"
    length: int         # tokens per sequence
    batch: int
    seconds: float      # median per forward
    speedup: float      # dense seconds / this row's seconds

    @property
    def sequences_per_second(self) -> float:
        return self.batch / self.seconds


def bench_coda(*, model_name: str = "minilm", lengths=(128, 512), batches=(1, 32), reductions=(2, 4, 8),
               adapter_dim: int = 64, rounds: int = 5, precision: str = "fp32", seed: int = 0,
               log=print) -> list[SpeedRow]:
    """Time the dense encoder, the parallel-adapter model and CoDA at each r, for each (length, batch)."""
    base, _ = load_encoder(model_name)
    models = {"dense": convert(base, method="probe", num_labels=2),
              "adapter": convert(base, method="adapter", adapter_dim=adapter_dim, num_labels=2)}
    for r in reductions:
        models[f"coda r={r}"] = convert(base, method="coda", reduction=r, adapter_dim=adapter_dim, num_labels=2)
    g = torch.Generator().manual_seed(seed)
    for m in models.values():
        m.eval()
        for p in m.parameters():  # adapters start at zero; give them real weights so no work is trivially zero
            if p.requires_grad and p.dim() >= 2 and not bool(p.any()):
                p.data.normal_(0, 0.02, generator=g)
    rows: list[SpeedRow] = []
    for length in lengths:
        for batch in batches:
            ids = torch.randint(1000, base.config.vocab_size, (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.int64)

            def call(m):
                def run():
                    with torch.inference_mode(), autocast(precision):
                        m(ids, mask)
                return run

            times = timed_alternating({name: call(m) for name, m in models.items()}, rounds)
            for name, sec in times.items():
                rows.append(SpeedRow(name, length, batch, sec, times["dense"] / sec))
            log(f"length {length} batch {batch}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in times.items()))
    return rows


def speed_table(rows: list[SpeedRow]) -> str:
    """Markdown table: one row per model, a column per (length, batch) with speed-up and time."""
    keys = sorted({(r.length, r.batch) for r in rows})
    names = list(dict.fromkeys(r.model for r in rows))
    cell = {(r.model, r.length, r.batch): r for r in rows}
    head = "| model | " + " | ".join(f"{t} tok, batch {b}" for t, b in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for n in names:
        parts = []
        for t, b in keys:
            r = cell[(n, t, b)]
            parts.append(f"{r.speedup:.2f}x ({r.seconds * 1e3:.0f} ms)")
        lines.append(f"| {n} | " + " | ".join(parts) + " |")
    return "\n".join(lines)
