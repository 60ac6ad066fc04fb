"""Inference speed of FFN-pruned models against the dense one (``condcomp prune bench``).

For a dense model (SmolLM2-135M, a Hugging Face folder or a condcomp run) and each sparsity:

- decode tokens/s: greedy generation with a KV cache, batch 1, a ``prompt_len``-token prompt;
- prefill time of ``prefill_len`` tokens;
- the input-conditioned overhead per prompt, as a share of one generation: deployed, a conditioned
  model runs ``condcomp.convert.prune.prefill`` (a masked pass over the prompt that fills the KV
  cache while the predictors pick the channels, then the gather into the compact model) and decodes
  from that cache; the overhead is that prefill minus the compact model's own pass over the prompt,
  which it replaces. (Timing the two short parts directly is steadier than subtracting two whole
  generations, whose run-to-run spread in bf16 is larger than the overhead.)
- the memory-bound limit: decoding one token reads every weight once, so at batch 1 no kernel can
  beat (dense weight bytes) / (pruned weight bytes); the measured ratio is compared with it.

The channels are chosen by magnitude for the compact models (speed depends only on how many are
kept). The conditioned model wraps the same dense weights with untrained predictors: its cost does
not depend on what they learned. Models are timed alternately, round by round; medians.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from condcomp.train.optim import autocast


@dataclass
class SpeedRow:
    name: str
    d_ff: int
    params: int
    precision: str
    decode_tok_s: float
    decode_vs_dense: float
    prefill_ms: float
    prefill_vs_dense: float
    memory_bound_limit: float  # dense weight bytes / this model's
    overhead_ms: float | None = None  # conditioned: prefill (masked pass + gather) minus the compact prompt pass
    overhead_share: float | None = None  # of one generation with the compact model


def conditioned_twin(dense, sparsity: float, prompt_len: int):
    """An ``ffn: prunable`` (conditioned) model holding ``dense``'s weights, predictors untrained."""
    from condcomp.models import Transformer

    cfg = type(dense.cfg).from_dict({**dense.cfg.to_dict(), "ffn": "prunable",
                                     "prunable": {"method": "conditioned", "sparsity": sparsity,
                                                  "prompt_len": prompt_len, "activation": dense.cfg.ffn}})
    model = Transformer(cfg).to(next(dense.parameters()).dtype)
    model.load_state_dict(dense.state_dict(), strict=False)  # the predictors keep their initialisation
    return model.eval()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(dense, *, sparsities=(0.5, 0.75), new_tokens: int = 256, prompt_len: int = 64, prefill_len: int = 512,
            rounds: int = 3, precisions=("fp32", "bf16"), log=print) -> list[SpeedRow]:
    from condcomp.convert.prune import magnitude_masks, prune_ffn_channels
    from condcomp.convert.prune import prefill as conditioned_prefill
    from condcomp.layers.kv_cache import ModelCache

    dense = dense.eval()
    vocab = dense.cfg.vocab_size
    if prompt_len + new_tokens > dense.cfg.seq_len or prefill_len > dense.cfg.seq_len:
        from condcomp.config import ConfigError

        raise ConfigError(f"prompt + new tokens ({prompt_len + new_tokens}) and the prefill ({prefill_len}) must fit the "
                          f"model's seq_len {dense.cfg.seq_len}; use fewer --new-tokens or a shorter --prefill-len")
    models = {"dense": dense}
    twins = {}
    for sp in sparsities:
        models[f"{sp:.0%} pruned"] = prune_ffn_channels(dense, magnitude_masks(dense, sp)).eval()
        twins[f"{sp:.0%} pruned"] = conditioned_twin(dense, sp, prompt_len)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    long = torch.randint(0, vocab, (1, prefill_len), generator=gen)

    def weight_bytes(m) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    rows = []
    for precision in precisions:
        decode = {name: [] for name in models}
        prefill = {name: [] for name in models}
        overhead = {name: [] for name in twins}
        with torch.no_grad(), autocast(precision):
            for _ in range(rounds):
                for name, m in models.items():
                    decode[name].append(_time(lambda: m.generate(prompt, new_tokens, temperature=0)))
                    prefill[name].append(_time(lambda: m(long, last_only=True)))
                    if name in twins:  # the conditioned prefill, minus the compact model's pass it replaces
                        overhead[name].append(_time(lambda: conditioned_prefill(twins[name], prompt))
                                              - _time(lambda: m(prompt, cache=ModelCache(), last_only=True)))
        d0, p0 = statistics.median(decode["dense"]), statistics.median(prefill["dense"])
        for name, m in models.items():
            d, pf = statistics.median(decode[name]), statistics.median(prefill[name])
            ov = statistics.median(overhead[name]) if name in overhead else None
            rows.append(SpeedRow(name=name, d_ff=m.cfg.ffn_hidden, params=sum(p.numel() for p in m.parameters()),
                                 precision=precision, decode_tok_s=new_tokens / d, decode_vs_dense=d0 / d,
                                 prefill_ms=pf * 1e3, prefill_vs_dense=p0 / pf,
                                 memory_bound_limit=weight_bytes(dense) / weight_bytes(m),
                                 overhead_ms=None if ov is None else ov * 1e3,
                                 overhead_share=None if ov is None else ov / d))
            log(table_row(rows[-1]))
    return rows


TABLE_HEAD = ("| model | d_ff | params | precision | decode tok/s | x dense | memory-bound limit | prefill ms | x dense | "
              "conditioned overhead ms | share of a generation |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def table_row(r: SpeedRow) -> str:
    ov = "" if r.overhead_ms is None else f"{r.overhead_ms:.1f}"
    share = "" if r.overhead_share is None else f"{r.overhead_share:.1%}"
    return (f"| {r.name} | {r.d_ff} | {r.params / 1e6:.1f}M | {r.precision} | {r.decode_tok_s:.1f} | "
            f"{r.decode_vs_dense:.2f}x | {r.memory_bound_limit:.2f}x | {r.prefill_ms:.0f} | {r.prefill_vs_dense:.2f}x | "
            f"{ov} | {share} |")
