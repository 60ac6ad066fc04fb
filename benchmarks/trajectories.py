"""Record (or check) 20-step training-loss trajectories of every shipped config.

A refactoring that should change nothing is checked by recording before it and comparing after:

    python benchmarks/trajectories.py --out /tmp/before.json            # on the old code
    python benchmarks/trajectories.py --out /tmp/after.json --compare /tmp/before.json

Each config trains as shipped (model shape, precision, routing) for ``--steps`` steps from seed 0,
with evaluation and checkpoints pushed past the end so only the training losses are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def trajectory(config: Path, steps: int, batch_size: int, run_dir: Path) -> list[float]:
    from condcomp.config import load_config
    from condcomp.train import Trainer

    cfg = load_config(config, [f"train.steps={steps}", f"train.batch_size={batch_size}", "train.seed=0",
                               f"train.eval_every={10 * steps}", "train.eval_batches=1",
                               f"train.checkpoint_every={10 * steps}", "train.progress=false",
                               "train.threads=2", f"run_dir={run_dir}"])
    torch.manual_seed(0)
    return Trainer(cfg).train().losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="JSON file: config name -> list of losses")
    p.add_argument("--compare", help="an earlier --out file: print the largest difference per config")
    p.add_argument("configs", nargs="*", help="default: every configs/*.yaml")
    args = p.parse_args()
    paths = [Path(c) for c in args.configs] or sorted((ROOT / "configs").glob("*.yaml"))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            result[path.stem] = trajectory(path, args.steps, args.batch_size, Path(tmp) / path.stem)
            print(f"{path.stem:12s} first {result[path.stem][0]:.6f} last {result[path.stem][-1]:.6f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        print(f"\n{'config':12s} {'max |after - before|':>22s}")
        for name, losses in result.items():
            if name not in before:
                print(f"{name:12s} {'(not in before)':>22s}")
                continue
            diff = max(abs(a - b) for a, b in zip(losses, before[name]))
            print(f"{name:12s} {diff:22.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
