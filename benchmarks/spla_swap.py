"""SmolLM2-135M with its attention swapped, before any training: which part of SPLA costs what.

Each variant loads the same pretrained weights and evaluates the same validation windows of English technical prose (python-docs, 2,048 tokens each,
inference mode, bf16 autocast). Rows separate the approximations: reading every block exactly (must
equal dense), choosing 8 blocks with no residual (first- and second-order scores), SPLA's residual
on top with its per-head alpha at the from-scratch default 1 / head_dim and calibrated on two
training windows (what ``condcomp train --init`` does), and linear attention alone.

    python benchmarks/spla_swap.py --windows 4
"""

from __future__ import annotations

import argparse

import torch

from condcomp.convert.hf import from_hf, load_hf_model
from condcomp.data import load_corpus
from condcomp.data.tokenized import tokenize_corpus
from condcomp.train.trainer import evaluate_split

SEQ = 2048
BLOCKS = SEQ // 64
CALIBRATION_WINDOWS = 2
VARIANTS = {
    "dense (as imported)": {},
    f"spla, top_k {BLOCKS} (every block exact)": {"attention": "spla", "spla": {"block": 64, "top_k": BLOCKS}},
    "block-sparse, top 8, mean-key score, no residual": {"attention": "block_sparse", "spla": {"block": 64, "top_k": 8}},
    "top 8, second-order score, no residual": {"attention": "spla", "spla": {"block": 64, "top_k": 8, "residual": "none"}},
    "spla, top 8, second-order score + linear residual, alpha 1/head_dim": {"attention": "spla",
                                                                              "spla": {"block": 64, "top_k": 8}},
    "spla, top 8, second-order score + linear residual, alpha calibrated": {"attention": "spla",
                                                                              "spla": {"block": 64, "top_k": 8}},
    "linear attention only": {"attention": "linear", "spla": {"block": 64}},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help=f"validation windows of {SEQ} tokens")
    args = p.parse_args()
    hf, tokenizer, _ = load_hf_model("smollm2", torch.float32)
    corpus = tokenize_corpus(load_corpus("python-docs"), tokenizer, name="smollm2")
    print(f"| SmolLM2-135M at step 0, {SEQ} tokens | val bits/byte | gap to dense |")
    print("|---|---|---|")
    calibration = torch.from_numpy(corpus.train[: CALIBRATION_WINDOWS * SEQ].astype("int64")).view(-1, SEQ)
    dense = None
    for label, overrides in VARIANTS.items():
        model, _ = from_hf(hf, seq_len=SEQ, overrides=overrides,
                           calibrate_on=calibration if "calibrated" in label else None)
        r = evaluate_split(model, corpus.val, batch_size=1, max_batches=args.windows, precision="bf16",
                           token_bytes=corpus.bytes_of("val"))
        dense = r["bpb"] if dense is None else dense
        print(f"| {label} | {r['bpb']:.4f} | {r['bpb'] - dense:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
