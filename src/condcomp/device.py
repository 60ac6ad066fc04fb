"""Where a command computes: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

One spelling for every command (``--device``) and config (``train.device``). ``check_device_spec``
validates the spelling alone (configs are checked at construction, on any machine);
``resolve_device`` also checks that the device exists here, and fails with the fix in the message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on use: `condcomp --help` stays quick
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = "where to compute: auto (CUDA when present, else CPU), cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device that is misspelt or not present on this machine; the message says what to use."""


def check_device_spec(spec: str) -> str:
    """The spec unchanged if it is spelt right, else DeviceError."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise DeviceError(f"device must be {DEVICE_CHOICES}, got {spec!r}")
    return spec


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device a spec names on this machine. auto (or None): cuda (the current CUDA device)
    when CUDA is available, else cpu."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = check_device_spec(spec or "auto")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but this machine has no CUDA device (or this PyTorch build "
                          "has no CUDA); use --device cpu or auto")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are "
                          f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> "bf16" on CUDA (its tensor cores), "fp32" elsewhere; "fp32" and "bf16" unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if str(device).split(":")[0] == "cuda" else "fp32"


def can_read_back(t: "torch.Tensor") -> bool:
    """True where reading a value of ``t`` on the host is free: a real CPU tensor. False on an
    accelerator, where it would stall the stream until the device catches up, and while tracing
    (fake tensors, torch.compile), where values are unknown. Value checks that only make errors
    readable (NaN scores, out-of-range positions) run where this is True."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def add_device_option(parser, *, default: str = "auto") -> None:
    """Add ``--device`` to an argparse (sub)parser."""
    parser.add_argument("--device", default=default, type=device_spec, help=DEVICE_HELP)


def device_spec(text: str) -> str:
    """An argparse type: a device spec, checked for spelling."""
    import argparse

    try:
        return check_device_spec(text)
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
