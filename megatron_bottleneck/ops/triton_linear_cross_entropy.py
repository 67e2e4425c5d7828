"""Triton kernels for the two vocab loops of :mod:`.linear_cross_entropy` (no fp8).

Shapes: u [T, k] (head input), weight [V_local, k] (this rank's vocab shard F), of which the first
``n_real`` rows are real classes; logits z_ti = u_t . F_i for i < n_real (never stored in HBM).
dtypes: float32 (dots in IEEE fp32, no TF32: matches torch fp32 to ~1e-6), bfloat16 and float16
(tensor-core dots, float32 accumulation; the logits stay float32, as in the torch loop on CUDA, where a
CPU's 16-bit mm rounds them). No [T, C] chunk is held, so chunk_size / the memory budget do
not apply on this path.

Forward, :func:`forward_chunks` (u, F, n_real, tgt -> lse, lse2 or None, z_y, sum_z or None, [T] float32)::

    lse_t = log sum_{i < n_real} exp(z_ti),      lse2_t = log sum_{i < n_real} exp(2 z_ti)
    z_y_t = z_{t, tgt_t} (0 where tgt_t = -1),   sum_z_t = sum_{i < n_real} z_ti

Grid (T / BLOCK_T, S): each program holds BLOCK_T tokens and walks every S-th vocab tile of BLOCK_V
rows (the z tile is built with an inner loop over k in BLOCK_K pieces), keeping an online running max m,
sum_i exp(z - m) and sum_i exp(2 (z - m)) in registers, and the target logit / logit sum of its tiles;
it writes its partials to [S, T] and torch takes a logsumexp (lse, lse2) or a sum (z_y, sum_z) over the
S splits. S > 1 only when T / BLOCK_T programs alone would leave SMs idle (small T, big vocab).

Backward, :func:`backward_chunks` (adds to grad_u [T, k] and grad_w[:n_real] [n_real, k], both float32)::

    G = coef[:, None] exp(z - lse[:, None]) - b[:, None] [i = tgt] - e[:, None]    [T, n_real], float32
    grad_u += G @ F[:n_real],                         grad_w[:n_real] += G^T @ u

(coef may be negative or 0; the one-hot term b only where tgt_t is the tile's column; e the smoothing
term, optional). Grid (T / BLOCK_T, n_real / BLOCK_V), as in Apple's cut-cross-entropy: each program
recomputes its BLOCK_T x BLOCK_V logit tile, forms G in float32 registers (exp, scale, one-hot, smoothing),
casts it to u's dtype for the 16-bit dots, then loops over k in BLOCK_K pieces adding G F_tile to grad_u
and G^T u_tile to grad_w with float32 ``tl.atomic_add``. Tiles whose tokens have coef = b = e = 0
(ignored tokens) skip the GEMMs. Choice: atomics, so the float32 sums are NOT bitwise deterministic run
to run (order of the adds); the atomic-free alternative (a dU kernel over token blocks, a dF kernel over
vocab blocks) computes the logits once more and needs a [BLOCK_T, k] accumulator. Block sizes are fixed
(no autotune): BLOCK_T = 64, BLOCK_V = 128, BLOCK_K = 64 for 16-bit inputs (32 for float32), 8 warps on
the GPU.

Choosing this path: :func:`resolve_kernel` gives the mode ("torch" | "triton" | "auto"): the environment
variable ``MB_FUSED_KERNEL`` when it is set and not empty, else the op's ``kernel`` argument (default
"torch"); :func:`should_use` applies it to a tensor ("torch": never; "triton": always, a ValueError if
Triton or CUDA is missing; "auto": on CUDA when Triton imports; never for fp8 or other dtypes than
float32 / bfloat16 / float16). Under ``TRITON_INTERPRET=1`` CPU tensors are allowed so the kernels run
in Triton's interpreter, which multiplies bfloat16 dot operands as raw bits and truncates float32 ->
bfloat16 casts: there the bfloat16 tiles are upcast to float32 first, and G is rounded to nearest bfloat16
(bit arithmetic) before its cast, so the rounding points and mode stay those of a GPU.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

try:  # optional dependency: the module imports without it, available() says False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_T, BLOCK_V = 64, 128


def available() -> bool:
    """True when Triton imported."""
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


KERNELS = ("torch", "triton", "auto")


def check_kernel(kernel) -> None:
    """ValueError unless ``kernel`` is one of "torch", "triton", "auto"."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'torch', 'triton' or 'auto', got {kernel!r}.")


def resolve_kernel(kernel: str = "torch") -> str:
    """The kernel mode in force: MB_FUSED_KERNEL when set and not empty (it overrides the argument), else
    ``kernel``. ValueError for any other value than "torch", "triton", "auto" (case-insensitive env)."""
    env = os.environ.get("MB_FUSED_KERNEL", "").strip().lower()
    if env:
        if env not in KERNELS:
            raise ValueError(f"MB_FUSED_KERNEL must be 'auto', 'torch' or 'triton', got {env!r}.")
        return env
    check_kernel(kernel)
    return kernel


def should_use(u: torch.Tensor, q, kernel: str = "torch") -> bool:
    """Whether the op runs these kernels for head input ``u`` (q: the op's fp8 cache, None without fp8).

    Mode = :func:`resolve_kernel` (kernel) (MB_FUSED_KERNEL overrides ``kernel``). Never for fp8 (q is not
    None) or other dtypes than float32 / bfloat16 / float16. "torch" -> False; "triton" -> True
    (ValueError if Triton or CUDA is missing; CPU tensors are fine under TRITON_INTERPRET=1); "auto" ->
    True on CUDA when Triton is available. The op's default is "torch" until the kernels' GPU test
    (tests/unit/test_ops_triton.py::test_triton_kernels_on_gpu) has passed on a GPU: they are verified
    on CPU through Triton's interpreter only.
    """
    mode = resolve_kernel(kernel)
    if mode == "torch" or q is not None or u.dtype not in _DTYPES:
        return False
    if mode == "triton":
        if not available():
            raise ValueError("kernel 'triton' (or MB_FUSED_KERNEL=triton) but triton is not importable; "
                             "install triton or use kernel='torch'.")
        if not (u.is_cuda or _interpret()):
            raise ValueError("kernel 'triton' (or MB_FUSED_KERNEL=triton) needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 for CPU tensors).")
        return True
    return available() and u.is_cuda


def _block_k(dtype) -> int:
    return 32 if dtype == torch.float32 else 64


def _precision(u: torch.Tensor):
    """(input_precision, upcast) for tl.dot: IEEE fp32 for float32 (no TF32), the backend's default for
    16-bit inputs; see _mma for the upcast."""
    up = u.dtype == torch.bfloat16 and not u.is_cuda and _interpret()
    return ("ieee" if u.dtype == torch.float32 else None), up


def _launch_opts(x: torch.Tensor) -> dict:
    return {} if not x.is_cuda else dict(num_warps=8, num_stages=3, enable_fp_fusion=True)


if triton is not None:

    @triton.jit
    def _mma(a, b, acc, PREC: tl.constexpr, UP: tl.constexpr):
        """acc + a @ b (float32). UP: upcast to float32 first (Triton's CPU interpreter multiplies
        bfloat16 operands as raw uint16 bits, so bfloat16 runs there in float32; never on a GPU)."""
        if UP:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _round_bf16(x):
        """float32 x rounded to the nearest bfloat16 (ties to even), still float32. Only for Triton's CPU
        interpreter, whose float32 -> bfloat16 cast truncates (a GPU's rounds to nearest)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _logit_tile(u_rows, w_cols, mask_t, mask_v, K, s_uk, s_wk, PREC: tl.constexpr, UP: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """z [BT, BV] float32 = u[t-block] F[v-tile]^T, accumulated over k in BK pieces (edges masked to 0)."""
        offs_k0 = tl.arange(0, BK)
        z = tl.zeros((BT, BV), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            a = tl.load(u_rows + offs_k[None, :] * s_uk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + offs_k[:, None] * s_wk, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            z = _mma(a, b, z, PREC, UP)
        return z

    @triton.jit
    def _lse_fwd_kernel(u_ptr, w_ptr, tgt_ptr, lse_ptr, lse2_ptr, zy_ptr, sz_ptr, T, K, n_real, n_split,
                        s_ut, s_uk, s_wv, s_wk, WANT_P2: tl.constexpr, WANT_SUM: tl.constexpr,
                        PREC: tl.constexpr, UP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                        BK: tl.constexpr):
        pid_t = tl.program_id(0)
        split = tl.program_id(1)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_v0 = tl.arange(0, BV)
        mask_t = offs_t < T
        u_rows = u_ptr + offs_t.to(tl.int64)[:, None] * s_ut
        m = tl.full((BT,), float("-inf"), tl.float32)
        s1 = tl.zeros((BT,), tl.float32)
        s2 = tl.zeros((BT,), tl.float32)
        zy = tl.zeros((BT,), tl.float32)
        sz = tl.zeros((BT,), tl.float32)
        tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=-1)
        for v0 in range(split * BV, n_real, n_split * BV):
            offs_v = v0 + offs_v0
            mask_v = offs_v < n_real
            w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * s_wv
            z = _logit_tile(u_rows, w_cols, mask_t, mask_v, K, s_uk, s_wk, PREC, UP, BT, BV, BK)
            zy += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)  # tgt < n_real
            if WANT_SUM:
                sz += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            e = tl.exp(z - m_new[:, None])
            r = tl.exp(m - m_new)
            s1 = s1 * r + tl.sum(e, axis=1)
            if WANT_P2:
                s2 = s2 * r * r + tl.sum(e * e, axis=1)
            m = m_new
        out = split * T + offs_t
        tl.store(lse_ptr + out, m + tl.log(s1), mask=mask_t)
        if WANT_P2:
            tl.store(lse2_ptr + out, 2 * m + tl.log(s2), mask=mask_t)
        tl.store(zy_ptr + out, zy, mask=mask_t)
        if WANT_SUM:
            tl.store(sz_ptr + out, sz, mask=mask_t)

    @triton.jit
    def _lse_bwd_kernel(u_ptr, w_ptr, lse_ptr, coef_ptr, tgt_ptr, b_ptr, e_ptr, gu_ptr, gw_ptr, T, K, n_real,
                        s_ut, s_uk, s_wv, s_wk, s_gut, s_guk, s_gwv, s_gwk, HAS_E: tl.constexpr,
                        PREC: tl.constexpr, UP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                        BK: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_v = pid_v * BV + tl.arange(0, BV)
        offs_k0 = tl.arange(0, BK)
        mask_t = offs_t < T
        mask_v = offs_v < n_real
        t64 = offs_t.to(tl.int64)
        v64 = offs_v.to(tl.int64)
        u_rows = u_ptr + t64[:, None] * s_ut
        w_cols = w_ptr + v64[None, :] * s_wv
        coef = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        bt = tl.load(b_ptr + offs_t, mask=mask_t, other=0.0)
        act = tl.abs(coef) + tl.abs(bt)
        if HAS_E:
            et = tl.load(e_ptr + offs_t, mask=mask_t, other=0.0)
            act += tl.abs(et)
        if tl.max(act, axis=0) > 0:
            lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
            tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=-1)
            z = _logit_tile(u_rows, w_cols, mask_t, mask_v, K, s_uk, s_wk, PREC, UP, BT, BV, BK)
            # dL/dz in float32, one-hot and smoothing included, before the cast for the dots
            p = coef[:, None] * tl.exp(z - lse[:, None])
            p -= tl.where(offs_v[None, :] == tgt[:, None], bt[:, None], 0.0)
            if HAS_E:
                p -= et[:, None]
            p = tl.where(mask_t[:, None] & mask_v[None, :], p, 0.0)
            if UP:  # interpreter: round to nearest as a GPU's cast does (the interpreter's truncates)
                p = _round_bf16(p)
            p = p.to(u_ptr.dtype.element_ty)
            pt = tl.trans(p)
            for k0 in range(0, K, BK):
                offs_k = k0 + offs_k0
                mask_k = offs_k < K
                # dU[t, k] += sum_v P[t, v] F[v, k]   (F tile loaded as [BV, BK])
                w_tile = tl.load(w_ptr + v64[:, None] * s_wv + offs_k[None, :] * s_wk,
                                 mask=mask_v[:, None] & mask_k[None, :], other=0.0)
                du = _mma(p, w_tile, tl.zeros((BT, BK), tl.float32), PREC, UP)
                tl.atomic_add(gu_ptr + t64[:, None] * s_gut + offs_k[None, :] * s_guk, du,
                              mask=mask_t[:, None] & mask_k[None, :], sem="relaxed")
                # dF[v, k] += sum_t P[t, v] u[t, k]
                u_tile = tl.load(u_rows + offs_k[None, :] * s_uk, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                dw = _mma(pt, u_tile, tl.zeros((BV, BK), tl.float32), PREC, UP)
                tl.atomic_add(gw_ptr + v64[:, None] * s_gwv + offs_k[None, :] * s_gwk, dw,
                              mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")


def _check(u: torch.Tensor, weight: torch.Tensor) -> None:
    if not available():
        raise RuntimeError("triton is not importable; use the torch path (kernel='torch').")
    if u.dtype not in _DTYPES or weight.dtype != u.dtype:
        raise ValueError(f"Triton LCE kernels take float32 / bfloat16 / float16 u and weight of one dtype, "
                         f"got {u.dtype} and {weight.dtype}.")


def _num_splits(t_blocks: int, v_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(2, v_tiles)  # the interpreter: exercise the split combine, cheaply
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // t_blocks)  # about two programs per SM
    return max(1, min(want, v_tiles // 4 or 1))  # each split keeps >= 4 vocab tiles


def _no_target(t: int, device) -> torch.Tensor:
    return torch.full((t,), -1, dtype=torch.long, device=device)


def forward_chunks(u: torch.Tensor, weight: torch.Tensor, n_real: int, want_p2: bool,
                   tgt: Optional[torch.Tensor] = None, want_sum: bool = False):
    """(lse [T], lse2 [T] or None, z_y [T], sum_z [T] or None), float32, over rows [0, n_real) of weight.

    tgt [T]: the local row of each token's target, -1 where it is not a real row here (None: all -1);
    z_y = z_{t, tgt_t} (0 for -1). lse / lse2 are -inf where n_real == 0. See the module docstring."""
    _check(u, weight)
    t, k = u.shape
    z_y = torch.zeros(t, dtype=torch.float32, device=u.device)
    sum_z = torch.zeros_like(z_y) if want_sum else None
    if n_real == 0 or t == 0:
        m = torch.full((t,), float("-inf"), dtype=torch.float32, device=u.device)
        return m, (m.clone() if want_p2 else None), z_y, sum_z
    tgt = (_no_target(t, u.device) if tgt is None else tgt).contiguous()
    t_blocks, v_tiles = triton.cdiv(t, BLOCK_T), triton.cdiv(n_real, BLOCK_V)
    n_split = _num_splits(t_blocks, v_tiles, u.device)
    lse = torch.empty((n_split, t), dtype=torch.float32, device=u.device)
    lse2 = torch.empty_like(lse) if want_p2 else lse
    zy = torch.empty_like(lse)
    sz = torch.empty_like(lse) if want_sum else zy
    prec, up = _precision(u)
    _lse_fwd_kernel[(t_blocks, n_split)](
        u, weight, tgt, lse, lse2, zy, sz, t, k, n_real, n_split, u.stride(0), u.stride(1), weight.stride(0),
        weight.stride(1), WANT_P2=bool(want_p2), WANT_SUM=bool(want_sum), PREC=prec, UP=up, BT=BLOCK_T,
        BV=BLOCK_V, BK=_block_k(u.dtype), **_launch_opts(u))
    if n_split == 1:
        return lse[0], (lse2[0] if want_p2 else None), zy[0], (sz[0] if want_sum else None)
    return (torch.logsumexp(lse, 0), (torch.logsumexp(lse2, 0) if want_p2 else None), zy.sum(0),
            (sz.sum(0) if want_sum else None))


def backward_chunks(u: torch.Tensor, weight: torch.Tensor, n_real: int, lse: torch.Tensor, coef: torch.Tensor,
                    grad_u: torch.Tensor, grad_w: torch.Tensor, tgt: Optional[torch.Tensor] = None,
                    b: Optional[torch.Tensor] = None, e: Optional[torch.Tensor] = None) -> None:
    """grad_u [T, k] += G F[:n_real]; grad_w[:n_real] += G^T u (both float32), with
    G = coef exp(z - lse) - b [i = tgt] - e formed in float32 in the kernel (b, e [T]; None: 0)."""
    _check(u, weight)
    t, k = u.shape
    if n_real == 0 or t == 0:
        return
    if grad_u.dtype != torch.float32 or grad_u.shape != u.shape:
        raise ValueError(f"grad_u must be float32 {tuple(u.shape)}, got {grad_u.dtype} {tuple(grad_u.shape)}.")
    if grad_w.dtype != torch.float32 or grad_w.shape[0] < n_real or grad_w.shape[1] != k:
        raise ValueError(f"grad_w must be float32 [>= {n_real}, {k}], got {grad_w.dtype} {tuple(grad_w.shape)}.")
    lse = lse.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    tgt = (_no_target(t, u.device) if tgt is None else tgt).contiguous()
    b = (torch.zeros_like(coef) if b is None else b.to(torch.float32)).contiguous()
    has_e = e is not None
    e = e.to(torch.float32).contiguous() if has_e else b
    prec, up = _precision(u)
    grid = (triton.cdiv(t, BLOCK_T), triton.cdiv(n_real, BLOCK_V))
    _lse_bwd_kernel[grid](
        u, weight, lse, coef, tgt, b, e, grad_u, grad_w, t, k, n_real, u.stride(0), u.stride(1), weight.stride(0),
        weight.stride(1), grad_u.stride(0), grad_u.stride(1), grad_w.stride(0), grad_w.stride(1),
        HAS_E=has_e, PREC=prec, UP=up, BT=BLOCK_T, BV=BLOCK_V, BK=_block_k(u.dtype), **_launch_opts(u))
