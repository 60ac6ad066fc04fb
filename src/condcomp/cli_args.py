"""Shared by the command-line modules: argument types (numbers checked at the boundary), prompts as
token ids, and running one training job to its end."""

from __future__ import annotations

import argparse
import math


def number(kind, *, minimum=None, strictly: bool = False, maximum=None):
    """An argparse type: a finite ``kind`` (int or float) >= minimum (> minimum when strictly), <= maximum."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if strictly else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strictly else '>='} {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value
    return parse


def prompt_ids(text: str, tokenizer):
    """A --prompt as token ids [1, t]: bytes without a tokenizer, else the tokenizer's ids."""
    import torch

    from condcomp.config import ConfigError
    from condcomp.data import encode

    ids = encode(text) if tokenizer is None else torch.tensor(
        tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise ConfigError("--prompt must not be empty")
    return ids[None, :]


def run_training(cfg, resume):
    """Train ``cfg`` (a RunConfig) to its end, alone or as one rank of a torchrun job. Returns
    (trainer, result); the process group is left whatever happened."""
    from condcomp.distributed import shutdown
    from condcomp.train import Trainer

    finished = False
    try:
        trainer = Trainer(cfg, resume=resume or False)
        result = trainer.train()
        finished = True
    finally:
        shutdown(wait_for_peers=finished)  # a torchrun job: leave the process group, whatever happened
    return trainer, result
