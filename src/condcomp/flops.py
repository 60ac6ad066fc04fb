"""Executed-FLOP counting: ``torch.utils.flop_counter`` plus the attention kernels it misses on CPU.

PyTorch's counter knows the CUDA attention kernels but not the CPU one SDPA dispatches to
(``_scaled_dot_product_flash_attention_for_cpu``), so on CPU it counted attention scores and the
weighted sum of values as zero: a model's attention, and a technique that saves or multiplies it (MoD,
BAM's soft attention experts), would look free. Importing this module registers the CPU kernels with
the same formulas as the CUDA ones (the whole score matrix, causal or not, as PyTorch counts on GPU).

    with flop_counter() as counter:
        loss.backward()
    counter.get_total_flops()
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

_aten = torch.ops.aten
_CPU_FORWARD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_BACKWARD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


if _CPU_FORWARD is not None and _CPU_FORWARD not in flop_registry:
    register_flop_formula(_CPU_FORWARD)(_cpu_sdpa_flops)
if _CPU_BACKWARD is not None and _CPU_BACKWARD not in flop_registry:
    register_flop_formula(_CPU_BACKWARD)(_cpu_sdpa_backward_flops)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False)
