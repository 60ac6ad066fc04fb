"""How close a technique wrapped around pretrained blocks starts to the pretrained model.

SmolLM2-135M is brought in dense, with per-token layer skipping (``block: skip``) and with
mixture-of-depths (``block: mod``); each evaluates, before any training step, on the same validation
windows of the built-in corpus (inference mode, bf16 autocast). Prints bits per byte and the gap to
the dense model, and the bits per byte the same windows get in training mode (routers sampling as in
training: what the first training steps see).

    python benchmarks/pretrained_init.py --windows 16
"""

from __future__ import annotations

import argparse

import torch

from condcomp.convert.hf import from_hf, load_hf_model
from condcomp.data import load_corpus
from condcomp.data.tokenized import tokenize_corpus
from condcomp.data import eval_batches
from condcomp.train.optim import autocast
from condcomp.train.trainer import LN2, evaluate_split, lm_loss

VARIANTS = {
    "dense (as imported)": {},
    "skip, every layer, target rate 0.5": {"block": "skip", "skip": {"every": 1, "target_rate": 0.5}},
    "MoD, every 2nd layer, capacity 0.125": {"block": "mod", "mod": {"every": 2, "capacity": 0.125}},
    "MoD, every 2nd layer, capacity 0.5": {"block": "mod", "mod": {"every": 2, "capacity": 0.5}},
    "upcycled: every 2nd FFN -> 4 experts, top-2 dropless": "upcycle",
}


@torch.no_grad()
def training_mode_bpb(model, corpus, windows: int) -> float:
    """The same windows in training mode (routers sample as they do during training), seeded."""
    model.train()
    torch.manual_seed(0)
    nll = nbytes = 0.0
    for x, y, b in eval_batches(corpus.val, batch_size=4, seq_len=512, max_batches=max(1, windows // 4),
                                token_bytes=corpus.bytes_of("val")):
        with autocast("bf16"):
            nll += lm_loss(model(x).logits, y).item() * y.numel()
        nbytes += float(b.sum())
    model.eval()
    return nll / nbytes / LN2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="validation windows of 512 tokens")
    args = p.parse_args()
    hf, tokenizer, _ = load_hf_model("smollm2", torch.float32)
    corpus = tokenize_corpus(load_corpus("stdlib"), tokenizer, name="smollm2")
    print("| model at step 0 | val bits/byte | gap to dense | fraction computed (routed layers) | "
          "training-mode bits/byte |")
    print("|---|---|---|---|---|")
    dense_bpb = None
    for label, overrides in VARIANTS.items():
        torch.manual_seed(0)
        if overrides == "upcycle":
            from condcomp.convert import upcycle

            model = upcycle(from_hf(hf, seq_len=512)[0], num_experts=4, k=2, every=2).eval()
        else:
            model, _ = from_hf(hf, seq_len=512, overrides=overrides)
        fractions = []
        hooks = [m.register_forward_hook(lambda mod, a, r: fractions.append(float(r.metrics["fraction_selected"])))
                 for name, m in model.named_modules() if name.endswith(".router") and "ffn" not in name]
        r = evaluate_split(model, corpus.val, batch_size=4, max_batches=max(1, args.windows // 4), precision="bf16",
                           token_bytes=corpus.bytes_of("val"))
        for h in hooks:
            h.remove()
        dense_bpb = dense_bpb if dense_bpb is not None else r["bpb"]
        computed = f"{sum(fractions) / len(fractions):.3f}" if fractions else "1 (dense)"
        train_bpb = training_mode_bpb(model, corpus, args.windows)
        print(f"| {label} | {r['bpb']:.4f} | {r['bpb'] - dense_bpb:+.4f} | {computed} | {train_bpb:.4f} |", flush=True)


if __name__ == "__main__":
    main()
