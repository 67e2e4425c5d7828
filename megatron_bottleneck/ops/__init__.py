"""Fused head + loss operators (torch only; no Megatron import). See :mod:`.linear_cross_entropy`."""
from ..base.loss import HeadLossStats
from .fp8 import quantize, scaled_matmul
from .linear_cross_entropy import (
    DEFAULT_MEMORY_BUDGET,
    choose_chunk_size,
    default_memory_budget,
    linear_cross_entropy,
    logit_grad_rows,
    slice_rows,
)
from .reference import linear_cross_entropy_reference

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "HeadLossStats",
    "choose_chunk_size",
    "default_memory_budget",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "logit_grad_rows",
    "slice_rows",
    "quantize",
    "scaled_matmul",
]
