"""Fused head + loss operators (torch only; no Megatron import). See :mod:`.linear_cross_entropy`."""
from ..base.loss import HeadLossStats
from .fp8 import quantize, scaled_matmul
from .linear_cross_entropy import (
    ChunkLoopPlan,
    choose_chunk_size,
    chunk_count,
    chunk_row_bytes,
    default_memory_budget,
    fp32_output_mm,
    linear_cross_entropy,
    logit_grad_rows,
    memory_budget_for,
    slice_rows,
)
from .reference import linear_cross_entropy_reference

__all__ = [
    "ChunkLoopPlan",
    "HeadLossStats",
    "choose_chunk_size",
    "chunk_count",
    "chunk_row_bytes",
    "default_memory_budget",
    "fp32_output_mm",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "logit_grad_rows",
    "memory_budget_for",
    "slice_rows",
    "quantize",
    "scaled_matmul",
]
