"""The probe's linear algebra: row norms, PSD pseudo-inverses, the visible energy tr(K (W^T W)^+), per device tensors.

Notation as in :mod:`.stats`: G = dL/dZ (T x V), W (V x D) = F M (F the head's factor, V x k; M its mix, k x D or None
for a dense head), dH = G W (T x D), K = dH^T dH (D x D). Every function here is local (no collective) and keeps its
results on the device (no host sync); sums are float64.
"""
from __future__ import annotations

import torch

PINV_RTOL = 1e-10
"""Relative eigenvalue cut of :func:`pinv_psd` (and the Cholesky fast path's condition limit)."""


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of the per-micro-batch products: float64 on GPUs (cheap there, and immune to TF32),
    float32 on CPUs (float64 halves CPU matmul speed; the products' relative error stays ~1e-6)."""
    return torch.float64 if t.is_cuda else torch.float32


ROW_BLOCK = 512
"""Columns per float32 partial sum in :func:`row_sq_norms`."""


def row_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """``||g_t||^2`` per row of ``g`` [T, n] as float64 [T]: float32 squared norms of blocks of :data:`ROW_BLOCK`
    columns (strided views, no copy), summed in float64.

    Error: each block's float32 reduction is off by at most ~``ROW_BLOCK`` u32 (u32 = 2^-24) relative and typically
    by far less; the float64 sum over the n / ROW_BLOCK blocks adds ~n / ROW_BLOCK u64. Measured on a softmax - onehot
    chunk of 682 x 49,152 (CPU): 8e-8 relative, where one float32 norm per row is off by 1e-6 and one float32 norm
    over the whole chunk by 1e-4 (CPU reductions accumulate in a few sequential lanes). A float64 input is reduced
    in float64."""
    if g.dtype == torch.float64:
        return torch.linalg.vector_norm(g, dim=1).square()
    t, n = g.shape
    nb = n // ROW_BLOCK
    out = torch.zeros(t, dtype=torch.float64, device=g.device)
    if nb and g.stride(1) == 1:
        blocks = g.as_strided((t, nb, ROW_BLOCK), (g.stride(0), ROW_BLOCK, 1))
        out += torch.linalg.vector_norm(blocks, dim=2, dtype=torch.float32).double().square().sum(1)
    else:
        nb = 0
    if nb * ROW_BLOCK < n:
        out += torch.linalg.vector_norm(g[:, nb * ROW_BLOCK:], dim=1, dtype=torch.float32).double().square()
    return out


def pinv_psd(a: torch.Tensor, rtol: float = PINV_RTOL):
    """Pseudo-inverse and numerical rank (a 0-dim tensor) of a symmetric PSD matrix (float64 eigh)."""
    vals, vecs = torch.linalg.eigh(a.double())
    cut = vals.max().clamp(min=0) * rtol
    keep = (vals > cut).double()
    inv = (vecs * (keep / torch.where(keep > 0, vals, torch.ones_like(vals)))) @ vecs.t()
    return inv, keep.sum()


def _cholesky_ok(chol, info, rtol):
    diag = chol.diagonal() ** 2
    return (info == 0) & (diag.min() > rtol * diag.max())


def visible_energy(k, ftf, mix, wtw, need_pinv: bool = False, rtol: float = PINV_RTOL):
    """||G Q Q^T||^2 = tr(K (W^T W)^+), the head rank, (W^T W)^+ (or None) and whether the fast path held,
    all as device tensors (no host sync).

    Fast path, F and M of full rank k: with G F = dH M^T (M M^T)^-1 the trace lives in k x k,
    tr(S M K M^T S (F^T F)^-1) with S = (M M^T)^-1 (M = I for a dense head), by Cholesky; its ``ok`` flag is
    False when a factor is numerically singular (condition beyond 1/rtol), and the caller then takes
    :func:`visible_energy_pinv`. With ``need_pinv`` the eigen-pseudo-inverse of W^T W is used directly.
    """
    if need_pinv:
        return visible_energy_pinv(k, wtw, rtol) + (torch.ones((), dtype=torch.bool, device=k.device),)
    kk = ftf.shape[0]
    chol, info = torch.linalg.cholesky_ex(ftf)
    ok = _cholesky_ok(chol, info, rtol)
    k_basis = k
    if mix is not None:
        mchol, minfo = torch.linalg.cholesky_ex(mix @ mix.t())
        ok = ok & _cholesky_ok(mchol, minfo, rtol)
        s = torch.cholesky_inverse(mchol)
        k_basis = s @ (mix @ k @ mix.t()) @ s
    vis2 = torch.cholesky_solve(k_basis, chol).diagonal().sum()
    return vis2, torch.tensor(float(kk), dtype=torch.float64, device=k.device), None, ok


def visible_energy_pinv(k, wtw, rtol: float = PINV_RTOL):
    pinv, rank = pinv_psd(wtw, rtol)
    return (k * pinv).sum(), rank, pinv


def isotropic_baseline(head_rank: int, vocab_size: int) -> float:
    """Destroyed ratio of an isotropic gradient against a random rank-``head_rank`` subspace."""
    return max(0.0, 1.0 - head_rank / max(vocab_size - 1, 1)) ** 0.5


def token_visible_energy(dh: torch.Tensor, wtw_pinv: torch.Tensor) -> torch.Tensor:
    """Per-token ||P g_t||^2 = dh_t (W^T W)^+ dh_t^T ``[T]`` float64 from dh ``[T, D]`` = G W and the float64
    pseudo-inverse of W^T W (``pinv_psd``): the visible energy of each token's logit gradient."""
    dh = dh.double()
    return ((dh @ wtw_pinv.to(dh.device, torch.float64)) * dh).sum(dim=1)


def iter_split(flat: torch.Tensor):
    """Consume a flat tensor in pieces: ``take = iter_split(x); a = take(3); b = take(4)``."""
    pos = [0]

    def take(n: int) -> torch.Tensor:
        out = flat[pos[0] : pos[0] + n]
        pos[0] += n
        return out

    return take
