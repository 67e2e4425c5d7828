"""FP8 GEMMs without Transformer Engine: per-tensor scaled ``torch._scaled_mm``.

A tensor x is quantised as x ~ scale * x8 with ``scale = amax(|x|) / fp8_max`` (a float32 scalar) and
x8 = round(x / scale) in ``float8_e4m3fn`` (max 448, 3 mantissa bits: forward operands) or
``float8_e5m2`` (max 57344, 2 mantissa bits: gradients, which need range more than precision).
``scaled_matmul(a, b)`` returns (scale_a scale_b) (a8 @ b8), accumulated and returned in ``out_dtype``.

What ``torch._scaled_mm`` accepts (checked on torch 2.13 / 2.14, CPU build): every combination of
e4m3/e5m2 operands, per-tensor scales, row-wise scales ([M, 1] and [1, N]), row-major or column-major
mat2 and M not a multiple of 16. CUDA is stricter: mat2 must be column-major, K and N multiples of 16,
e5m2 x e5m2 is refused, and row-wise scales need SM90+ and bfloat16 output. This module uses only what
both accept (per-tensor scales, column-major mat2, at most one e5m2 operand), and requires M, K and N to
be multiples of 16 so that code tested on CPU does not fail on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
_EPS = 1e-12


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (E4M3, E5M2)


def quantize(x: torch.Tensor, dtype: torch.dtype = E4M3) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, float) -> (x8, scale) with x ~ x8.float() * scale; scale a float32 0-dim tensor."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=_EPS)
    scale = amax / fmax
    x8 = (x.float() / scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x8.float() * scale).to(dtype)


def check_multiple_of_16(name: str, size: int, hint: str) -> None:
    if size % 16:
        raise ValueError(f"FP8 GEMM: {name}={size} is not a multiple of 16; {hint}.")


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale_a: Optional[torch.Tensor] = None,
    scale_b: Optional[torch.Tensor] = None,
    a_dtype: torch.dtype = E4M3,
    b_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in ``out_dtype``, both operands in FP8 with per-tensor scales.

    An operand already in FP8 is used as is and needs its scale (``scale_a`` / ``scale_b``); a float
    operand is quantised to ``a_dtype`` / ``b_dtype``. M, K and N must be multiples of 16.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_matmul needs a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}.")
    m, k = a.shape
    n = b.shape[1]
    check_multiple_of_16("M (rows of a)", m, "pad the token dimension to a multiple of 16")
    check_multiple_of_16("K (columns of a, rows of b)", k, "use a hidden size / head rank that is a multiple of 16")
    check_multiple_of_16("N (columns of b)", n, "pad the output dimension (vocab chunk) to a multiple of 16")
    if is_fp8(a):
        if scale_a is None:
            raise ValueError("scaled_matmul: a is already FP8, pass its scale_a.")
        a8, sa = a, scale_a
    else:
        a8, sa = quantize(a, a_dtype)
    if is_fp8(b):
        if scale_b is None:
            raise ValueError("scaled_matmul: b is already FP8, pass its scale_b.")
        b8, sb = b, scale_b
    else:
        b8, sb = quantize(b, b_dtype)
    if a8.dtype == E5M2 and b8.dtype == E5M2:
        raise ValueError("scaled_matmul: e5m2 x e5m2 is refused by CUDA; make one operand e4m3.")
    b8 = b8.t().contiguous().t()  # column-major mat2 (CUDA requires it)
    return torch._scaled_mm(a8.contiguous(), b8, scale_a=sa.float(), scale_b=sb.float(), out_dtype=out_dtype)
