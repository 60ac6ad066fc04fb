"""Executed-FLOP counting: ``torch.utils.flop_counter`` plus the kernels it misses: CPU attention and
the grouped GEMM of MoE experts.

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


_GROUPED_MM = getattr(_aten, "_grouped_mm", None)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x (multiply-adds) of a grouped GEMM, whichever operand is jagged (MoE experts on CUDA):
    [m, k] @ [g, k, n] -> [m, n]; [k, m] @ [m, n] -> [g, k, n] (weight gradients); [g, m, k] @ [g, k, n].
    Rows are counted whole (the MoE routings fill every row)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [g, m, k] @ [k, n] jagged along n -> [m, n]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


if _GROUPED_MM is not None and _GROUPED_MM not in flop_registry:
    register_flop_formula(_GROUPED_MM)(_grouped_mm_flops)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False)
