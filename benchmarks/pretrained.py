"""SmolLM2-135M in condcomp and in Hugging Face transformers, same weights, same machine, one run.

1. Quality: validation bits per byte of both on the same windows of the built-in corpus (Python
   standard library source) and of English prose (Debian's python3.11-doc reST, when installed).
2. Speed: prefill tokens/s (512 tokens, batch 1 and 8) and greedy decode tokens/s with a KV cache
   (batch 1, 256 new tokens), fp32 and bf16 autocast. The two libraries are timed alternately, round
   by round; the table gives medians and condcomp / HF.
3. A continued-pretraining step of condcomp (seq 256, batch 8, bf16): tokens/s and peak RSS.

    python benchmarks/pretrained.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/pretrained.py --skip-quality --rounds 3
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import time
from pathlib import Path

import torch

from condcomp.convert.hf import from_hf, load_hf_model
from condcomp.data import load_corpus
from condcomp.data.tokenized import tokenize_corpus
from condcomp.train.optim import autocast, build_optimizer
from condcomp.train.trainer import evaluate_split, lm_loss

PROSE = Path("/usr/share/doc/python3.11/html/_sources")


class HFAdapter(torch.nn.Module):
    """Gives a HF causal LM condcomp's call signature (``model(x).logits``, ``cfg.seq_len``) so the same
    evaluation code runs both."""

    def __init__(self, hf, seq_len):
        super().__init__()
        self.hf = hf
        self.cfg = type("Cfg", (), {"seq_len": seq_len})()

    def forward(self, x):
        return self.hf(x)


def quality(model, hf, tokenizer, source: str, label: str, windows: int, seq_len: int) -> list[str]:
    corpus = tokenize_corpus(load_corpus(source), tokenizer, name="smollm2")
    rows = []
    for name, m in (("condcomp", model), ("HF transformers", HFAdapter(hf, seq_len))):
        r = evaluate_split(m, corpus.val, batch_size=4, max_batches=math.ceil(windows / 4), precision="bf16",
                           token_bytes=corpus.bytes_of("val"))
        rows.append(f"| {label} | {name} | {r['bpb']:.4f} | {math.exp(r['nll']):.3f} | {int(r['tokens']):,} | "
                    f"{int(r['bytes']):,} |")
    return rows


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def speed(model, hf, rounds: int, prompt_len: int, new_tokens: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for precision in ("fp32", "bf16"):
        for batch in (1, 8):
            x = torch.randint(0, 49152, (batch, prompt_len), generator=g)

            def ours(x=x, p=precision):
                with autocast(p):
                    model(x)

            def theirs(x=x, p=precision):
                with autocast(p):
                    hf(x)

            cases.append((f"prefill {prompt_len} tokens, batch {batch}, {precision}", batch * prompt_len, ours, theirs))
        prompt = torch.randint(0, 49152, (1, 32), generator=g)

        def ours_decode(p=precision):
            with autocast(p):
                model.generate(prompt, new_tokens, temperature=0)

        def theirs_decode(p=precision):
            with autocast(p):
                hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        cases.append((f"decode {new_tokens} tokens, batch 1, {precision}", new_tokens, ours_decode, theirs_decode))
    rows = []
    for label, tokens, ours, theirs in cases:
        ours(), theirs()  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(rounds):
            t_ours.append(_time(ours))
            t_theirs.append(_time(theirs))
        a, b = tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)
        rows.append(f"| {label} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def train_step(model, steps: int) -> str:
    model.train()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 49152, (8, 257), generator=g)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast("bf16"):
            loss = lm_loss(model(x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times[1:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"condcomp continued pretraining, seq 256 x batch 8, bf16 autocast, AdamW: "
            f"{8 * 256 / per_step:,.0f} tokens/s ({per_step:.2f} s/step, median of {steps}); "
            f"peak RSS of the process {rss:,.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--windows", type=int, default=16, help="validation windows of 512 tokens per corpus")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--train-steps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    hf, tokenizer, description = load_hf_model("smollm2", torch.float32)
    hf.eval()
    model, _ = from_hf(hf, dtype=torch.float32, seq_len=2048)
    model.cfg.seq_len = 512  # evaluation windows of 512 tokens (the rotary table still covers 2048)
    print(f"model: {description}, {model.num_parameters() / 1e6:.1f}M parameters\n", flush=True)
    if not args.skip_quality:
        print("| corpus | library | val bits/byte | token perplexity | tokens | bytes |\n|---|---|---|---|---|---|")
        for row in quality(model, hf, tokenizer, "stdlib", "Python stdlib source (built-in)", args.windows, 512):
            print(row, flush=True)
        if PROSE.is_dir():
            for row in quality(model, hf, tokenizer, str(PROSE), "python3.11-doc reST (English prose)",
                               args.windows, 512):
                print(row, flush=True)
        else:
            print(f"| English prose | (skipped: {PROSE} missing; apt-get install python3.11-doc) | | | | |")
        print()
    if not args.skip_speed:
        model.cfg.seq_len = 2048
        print("| case | condcomp tokens/s | HF transformers tokens/s | condcomp / HF |\n|---|---|---|---|", flush=True)
        speed(model, hf, args.rounds, 512, args.new_tokens)
        print()
    del hf
    print(train_step(model, args.train_steps))


if __name__ == "__main__":
    main()
