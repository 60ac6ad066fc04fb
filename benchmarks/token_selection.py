"""Token-selection layers against what they replace and against their ideal, ratios in one run.

1. Mixture-of-depths block at 12.5% capacity vs the dense block (d 512, 4096 tokens, training mode).
   Goal: <= 0.25x time, <= 0.35x activation memory. The "ideal" row runs the same block on
   pre-gathered selected tokens with no router, gather or scatter.
2. CoLT5 ConditionalFeedForward (2 x 2048 tokens, 256 heavy per sequence) vs its ideal (light FFN on
   all tokens + heavy FFN on pre-gathered routed tokens, no router) and the `colt5-attention`
   package's ConditionalRoutedFeedForward when installed. Goal: <= 1.05x the ideal.
3. CoLT5 ConditionalAttention (encoder form) vs dense SDPA attention at 4096 and 8192 tokens.

Activation memory = bytes autograd saves for backward plus the output (see condcomp.bench).
Timing alternates each row with its reference round by round (torch.utils.benchmark, all threads).

    .venv/bin/python -u benchmarks/token_selection.py [--rounds 7 --dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse

import torch

from condcomp.bench import parameter_storages, prepare, timed_pair
from condcomp.config import ModelConfig
from condcomp.layers import Attention, ConditionalAttention, ConditionalFeedForward, FeedForward, MixtureOfDepths
from condcomp.techniques.dense import transformer_block
from condcomp.train.allocator import tune_for_speed


def table(title: str, rows, x: torch.Tensor, dtype: str, rounds: int) -> None:
    """rows: (name, forward fn, reference name or None). Prints times and ratios to the reference."""
    params = parameter_storages(m for _, fn, _ in rows for m in getattr(fn, "modules", []))
    prepared = {}
    for name, fn, _ in rows:
        try:
            prepared[name] = prepare(fn, x, dtype, params)
        except RuntimeError as e:  # a peer that does not run under this precision
            print(f"({name}: fails under {dtype}: {str(e).splitlines()[0][:100]})")
    rows = [r for r in rows if r[0] in prepared]
    header = f"{dtype:>4} {title:44} {'fwd ms':>8} {'ratio':>7} {'fwd+bwd ms':>10} {'ratio':>7} {'act MiB':>8} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, _, ref in rows:
        p = prepared[name]
        if ref:
            r = prepared[ref]
            f, rf = timed_pair(p.forward, r.forward, rounds)
            fb, rfb = timed_pair(p.both, r.both, rounds)
            ratios = (f"{f / rf:.2f}x", f"{fb / rfb:.2f}x", f"{p.act_bytes / r.act_bytes:.2f}x")
        else:
            f, _ = timed_pair(p.forward, p.forward, max(3, rounds // 2))
            fb, _ = timed_pair(p.both, p.both, max(3, rounds // 2))
            ratios = ("", "", "")
        print(f"{'':4} {name:44} {f * 1e3:>8.1f} {ratios[0]:>7} {fb * 1e3:>10.1f} {ratios[1]:>7} "
              f"{p.act_bytes / 2**20:>8.1f} {ratios[2]:>7}")
    print()


class Fn:
    """A forward callable that remembers its modules (to exclude their parameters from memory)."""

    def __init__(self, fn, *modules):
        self.fn, self.modules = fn, modules

    def __call__(self, x):
        return self.fn(x)


def mod_rows(d: int, capacity: float, batch: int, seq: int):
    cfg = ModelConfig(d_model=d, n_layers=1, n_heads=8, seq_len=seq)
    torch.manual_seed(0)
    dense = transformer_block(model=cfg, layer_idx=0)
    inner = transformer_block(model=cfg, layer_idx=0)
    inner.load_state_dict(dense.state_dict())
    mod = MixtureOfDepths(inner, d_model=d, capacity=capacity).train()
    k = round(capacity * seq)
    # Ideal: the block on k contiguous tokens per sequence at their positions, nothing else.
    positions = torch.arange(0, seq, seq // k)[:k].expand(batch, k)

    def ideal(x):
        return dense(x[:, :k], positions=positions)[0]

    return [
        ("dense block", Fn(lambda x: dense(x)[0], dense), None),
        (f"MoD {capacity:.1%} (condcomp)", Fn(lambda x: mod(x)[0], mod), "dense block"),
        (f"ideal: block on {capacity:.1%} pre-gathered", Fn(ideal, dense), "dense block"),
    ]


def cff_rows(d: int, light: int, heavy: int, heavy_tokens: int, seq: int):
    torch.manual_seed(0)
    cap = heavy_tokens / seq
    cff = ConditionalFeedForward(d_model=d, light_d_ff=light, heavy_d_ff=heavy, capacity=cap).train()

    def ideal(x):  # light on all + heavy on the first heavy_tokens of each sequence, no router
        b = x.shape[0]
        y, _ = cff.light(x)
        return y.reshape(-1, d), cff.heavy(x[:, :heavy_tokens].reshape(-1, d))[0]

    dense_ffn = FeedForward(d_model=d, d_ff=heavy // 4, activation="gelu")
    rows = [("ideal: light all + heavy routed, no router", Fn(lambda x: torch.cat(ideal(x)), cff), None),
            ("condcomp ConditionalFeedForward", Fn(lambda x: cff(x)[0], cff), "ideal: light all + heavy routed, no router"),
            ("dense GELU FFN (d_ff = heavy / 4)", Fn(lambda x: dense_ffn(x)[0], dense_ffn), None)]
    try:
        from colt5_attention import ConditionalRoutedFeedForward

        peer = ConditionalRoutedFeedForward(d, num_heavy_tokens=heavy_tokens, light_ff_mult=light / d,
                                            heavy_ff_mult=heavy / d)
        rows.append(("colt5-attention ConditionalRoutedFeedForward", Fn(peer, peer),
                     "ideal: light all + heavy routed, no router"))
    except ImportError:
        print("(colt5-attention not installed: peer row skipped; pip install -e '.[peers]')")
    return rows


def attention_rows(d: int, heads: int, seq: int, window: int, q_cap: float, kv_cap: float):
    torch.manual_seed(0)
    dense = Attention(d_model=d, n_heads=heads, max_len=seq, causal=False)
    cond = ConditionalAttention(d_model=d, n_heads=heads, max_len=seq, causal=False, window=window,
                                q_capacity=q_cap, kv_capacity=kv_cap).train()
    return [("dense SDPA attention", Fn(lambda x: dense(x)[0], dense), None),
            (f"ConditionalAttention (w {window}, q {q_cap:g}, kv {kv_cap:g})", Fn(lambda x: cond(x)[0], cond),
             "dense SDPA attention")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per row")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--parts", default="mod,cff,attention")
    p.add_argument("--allocator", choices=("fast", "glibc"), default="fast",
                   help="fast: the trainer's default (train.fast_allocator); glibc: glibc's own defaults")
    args = p.parse_args()
    parts = args.parts.split(",")
    fast_allocator = args.allocator == "fast" and tune_for_speed()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"allocator: {'the trainer default (fast)' if fast_allocator else 'glibc default'}\n")
    for dtype in args.dtypes.split(","):
        if "mod" in parts:
            x = torch.randn(4, 1024, 512)
            table("MoD block, d 512, 4 x 1024 tokens", mod_rows(512, 0.125, 4, 1024), x, dtype, args.rounds)
        if "cff" in parts:
            x = torch.randn(2, 2048, 512)
            table("CoLT5 FFN, d 512, 2 x 2048, 256 heavy/seq",
                  cff_rows(512, light=1024, heavy=8192, heavy_tokens=256, seq=2048), x, dtype, args.rounds)
        if "attention" in parts:
            for seq in (4096, 8192):
                x = torch.randn(1, seq, 512)
                table(f"CoLT5 attention, d 512, 8 heads, {seq} tokens",
                      attention_rows(512, 8, seq, window=128, q_cap=0.125, kv_cap=0.25), x, dtype,
                      max(3, args.rounds // 2))
    print("ratio: the row / its reference in the same run (MoD rows / the dense block; CoLT5 FFN rows / the "
          "ideal; attention / dense SDPA)")


if __name__ == "__main__":
    main()
