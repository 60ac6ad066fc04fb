"""Decode and prefill speed of FFN-pruned models against the dense one, and the per-prompt cost of
input-conditioned pruning (the predictors' pass over the prompt plus gathering the kept channels):
the speed half of the pruning issue. SmolLM2-135M by default; any dense model with --model (the
pruning grid's byte-LM seed: runs/pruning/stages/seed). See condcomp.bench.prune_speed for what is
timed and how.

    python benchmarks/pruning.py [--model smollm2] [--rounds 3] [--sparsities 0.5 0.75]
"""

from __future__ import annotations

import sys

from condcomp.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", "bench", *sys.argv[1:]]))
