"""Triton kernels for the two vocab loops of :mod:`.linear_cross_entropy` (no fp8).

Shapes: u [T, k] (head input), weight [V_local, k] (this rank's vocab shard F), of which the first
``n_real`` rows are real classes; logits z_ti = u_t . F_i for i < n_real. dtypes: float32 (dots in IEEE
fp32, no TF32: matches torch fp32 to ~1e-6), bfloat16 and float16 (tensor-core dots, float32
accumulation; the logits stay float32, as in the torch loop on CUDA, where a CPU's 16-bit mm rounds them).

Forward, :func:`forward_stats` (u, F, n_real, tgt -> lse, lse2 or None, z_y, sum_z or None, [T] float32)::

    lse_t = log sum_{i < n_real} exp(z_ti),      lse2_t = log sum_{i < n_real} exp(2 z_ti)
    z_y_t = z_{t, tgt_t} (0 where tgt_t = -1),   sum_z_t = sum_{i < n_real} z_ti

``_lse_fwd_kernel``, grid (T / BT, S): each program holds BT tokens and walks every S-th vocab tile of BV
rows (the z tile is built with an inner loop over k in BK pieces), keeping an online running max m,
sum_i exp(z - m) and sum_i exp(2 (z - m)) in registers, and the target logit / logit sum of its tiles;
it writes its partials to [S, T] and torch takes a logsumexp (lse, lse2) or a sum (z_y, sum_z) over the
S splits. S > 1 only when T / BT programs alone would leave SMs idle (small T, big vocab). No logits in HBM.

Backward, :func:`backward_chunks` (adds to grad_u [T, k] and grad_w[:n_real] [n_real, k], both float32)::

    G = coef[:, None] exp(z - lse[:, None]) - b[:, None] [i = tgt] - e[:, None]    [T, n_real], float32
    grad_u += G @ F[:n_real],                         grad_w[:n_real] += G^T @ u

(coef may be negative or 0; the one-hot term b only where tgt_t is the column; e the smoothing term,
optional, e_t w_i with class weights w; z is u F^T + bias with a bias, before the cap, and grad_bias += sum_t G
from float32 per-token-block column sums). The vocabulary is walked in chunks of C rows (``chunk``: the torch loop's chunk, sized by the
op's memory budget for two float32 [T, C] tensors); per chunk [v0, v0 + C), three launches, no atomics:

1. ``_grad_logits_kernel``, grid (T / BT, C / BV): recomputes the logit tile z = u_t-block F_v-tile^T
   (k loop in BK pieces), forms G in float32 registers (exp, scale, one-hot, smoothing) and stores it
   rounded once to u's dtype into a chunk buffer Gc [T, C] (16-bit for 16-bit inputs: the GEMMs' operand,
   the same rounding point as before). Token blocks whose tokens all have coef = b = e = 0 (ignored tokens)
   skip the logit GEMM and store zeros.
2. ``_mm_acc_kernel`` (C_out += A @ B, float32, each output tile owned by one program, grouped tile order
   for L2 reuse): the dU pass grad_u [T, k] += Gc [T, C] @ F[v0:v0+C] [C, k].
3. the same kernel, the dW pass: grad_w[v0:v0+C] [C, k] += Gc^T [C, T] @ u [T, k].

Traffic and FLOPs (one backward; T tokens, k = head width, V = n_real, e = bytes per input element, BT x BV
the old tile; numbers at the issue's T = 8192, k = 2048, V = 131072, bf16, BT = 64, BV = 128):

- GEMM FLOPs, both schemes: 2 T V k for the logit recompute + 2 T V k (dU) + 2 T V k (dW) = 6 T V k =
  13.2 TFLOP (8.8 of them the two gradient products). The new scheme recomputes the logits once, as the
  old one did: no extra FLOPs.
- Old scheme (one kernel, grid (T / BT, V / BV), float32 ``atomic_add`` of a [BT, k] dU tile and a [BV, k]
  dW tile per program): dU atomics (V / BV) T k 4 B = 68.7 GB, dW atomics (T / BT) V k 4 B = 137.4 GB:
  206 GB of float32 atomic read-modify-writes per backward; not deterministic (order of the adds).
- New scheme: 0 atomics. HBM writes: Gc, T V e = 2.1 GB (read back twice: 4.3 GB); grad_u read and
  written once per chunk, (V / C) T k 8 B (C = 16384, i.e. a 1 GiB budget at T = 8192: 8 chunks,
  1.07 GB; one chunk: 0.13 GB); grad_w read and written once, V k 8 B = 2.1 GB. About 10 GB of plain
  loads and stores in all (operand re-reads of the GEMMs are L2 traffic, as in any GEMM), against 206 GB of
  atomics: 13.2 TFLOP at ~700 dense bf16 TFLOP/s is ~19 ms, the 10 GB at 4.8 TB/s ~2 ms. Extra memory:
  the Gc buffer, T C e bytes (a quarter of the op's budget for 16-bit inputs, a half for float32).
- Deterministic: every float32 output element is written by one program per launch, its sum in a fixed
  order, so grad_u / grad_w are bitwise reproducible run to run on one GPU and configuration (the
  forward's split combine is a torch logsumexp / sum, also fixed).

Configurations (:func:`tile_config`): per kernel, input dtype and GPU family, chosen so that ptxas reports
0 spill bytes for 16-bit inputs and the shared memory fits the family: "sm80" (capability 8.x, and 12.x:
sm_86 / sm_89 / sm_120 have 99 KB per block, sm_80 163 KB: the family is sized to 99 KB), "sm90" (227 KB),
"sm100" (227 KB). ``bench/triton_resources.py`` (through :func:`compile_resources`) compiles every kernel
at these configurations for sm_80, sm_90a and sm_100a without a GPU and reports registers, spills and
shared memory; tests/kernels/test_ops_triton_kernels.py asserts 0 spills for 16-bit inputs and the limits.

Choosing this path: :func:`resolve_kernel` gives the mode ("torch" | "triton" | "auto"): the environment
variable ``MB_FUSED_KERNEL`` when it is set and not empty, else the op's ``kernel`` argument (default
"torch"); :func:`should_use` applies it to a tensor ("torch": never; "triton": always, a ValueError if
Triton or CUDA is missing; "auto": on CUDA when Triton imports; never for fp8 or other dtypes than
float32 / bfloat16 / float16). Under ``TRITON_INTERPRET=1`` CPU tensors are allowed so the kernels run
in Triton's interpreter (with small tiles, :data:`INTERPRETER_CONFIG`, so tiny test shapes cover several
tiles), which multiplies bfloat16 dot operands as raw bits and truncates float32 -> bfloat16 casts: there
the bfloat16 tiles are upcast to float32 first, and G is rounded to nearest bfloat16 (bit arithmetic)
before its cast, so the rounding points and mode stay those of a GPU.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from types import MappingProxyType
from typing import Dict, List, Mapping, Optional, Tuple

import torch

try:  # optional dependency: the module imports without it, available() says False
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel's launch configuration. lse_fwd / grad_logits: (BT, BV, BK) = (block_m, block_n, block_k);
    mm_acc: the output tile block_m x block_n and the reduction step block_k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


KERNEL_NAMES = ("lse_fwd", "grad_logits", "mm_acc")
_C = TileConfig
# (kernel, dtype name, family) -> TileConfig, chosen with bench/triton_resources.py (bench/RESULTS.md): ptxas
# reports 0 spill bytes for every entry (16-bit and float32) on sm_80 / sm_90a / sm_100a. 16-bit: 128-token
# blocks on sm90 / sm100 (the vocabulary is re-read T / BT times from L2), 64 on sm80 (99 KB); the GEMM tile
# 128 x 128 x 64 (128 x 256 spilled 192-480 B). float32 (IEEE FMA dots, no tensor cores): smaller k steps.
def _shipped_configs() -> Dict[Tuple[str, str, str], TileConfig]:
    c = {}
    for dt in ("bf16", "fp16"):
        c.update({("lse_fwd", dt, "sm80"): _C(64, 128, 64, 8, 3), ("grad_logits", dt, "sm80"): _C(64, 128, 64, 8, 3),
                  ("mm_acc", dt, "sm80"): _C(128, 128, 64, 8, 3)})
        for fam in ("sm90", "sm100"):
            c.update({("lse_fwd", dt, fam): _C(128, 128, 64, 8, 3), ("grad_logits", dt, fam): _C(128, 128, 64, 8, 3),
                      ("mm_acc", dt, fam): _C(128, 128, 64, 8, 4)})
    c.update({("lse_fwd", "fp32", "sm80"): _C(64, 128, 16, 8, 3),
              ("grad_logits", "fp32", "sm80"): _C(64, 128, 16, 8, 3), ("mm_acc", "fp32", "sm80"): _C(64, 64, 32, 4, 3)})
    for fam in ("sm90", "sm100"):
        c.update({("lse_fwd", "fp32", fam): _C(64, 128, 32, 8, 3), ("grad_logits", "fp32", fam): _C(64, 128, 32, 8, 3),
                  ("mm_acc", "fp32", fam): _C(64, 64, 32, 4, 3)})
    return c


CONFIGS: Mapping[Tuple[str, str, str], TileConfig] = MappingProxyType(_shipped_configs())
#: Triton's CPU interpreter (TRITON_INTERPRET=1): small tiles so tiny test shapes span several of them.
INTERPRETER_CONFIG = MappingProxyType({"lse_fwd": _C(32, 64, 16, 1, 1), "grad_logits": _C(32, 64, 16, 1, 1),
                                        "mm_acc": _C(32, 32, 16, 1, 1)})
#: Shared memory per block (bytes) of the smallest GPU of each family: sm_86 / sm_89 / sm_120 99 KB (sm_80:
#: 163 KB), sm_90 and sm_100 227 KB.
SHARED_LIMIT = MappingProxyType({"sm80": 99 * 1024, "sm90": 227 * 1024, "sm100": 227 * 1024})
#: The compile targets of :func:`compile_resources`: arch name -> (capability, family).
ARCHS = MappingProxyType({"sm_80": (80, "sm80"), "sm_90a": (90, "sm90"), "sm_100a": (100, "sm100")})


def family(capability: int) -> str:
    """The configuration family of a CUDA capability (major * 10 + minor): 9.x "sm90", 10.x / 11.x
    "sm100", anything else "sm80" (sized for 99 KB of shared memory: sm_86, sm_89, sm_120)."""
    if capability // 10 == 9:
        return "sm90"
    if capability // 10 in (10, 11):
        return "sm100"
    return "sm80"


def tile_config(kernel: str, dtype: torch.dtype, capability: Optional[int]) -> TileConfig:
    """The shipped configuration of ``kernel`` for inputs of ``dtype`` on a GPU of ``capability``
    (None: Triton's interpreter)."""
    if capability is None:
        return INTERPRETER_CONFIG[kernel]
    return CONFIGS[(kernel, _DTYPE_NAMES[dtype], family(capability))]


def available() -> bool:
    """True when Triton imported."""
    return triton is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


KERNELS = ("torch", "triton", "auto")


def check_kernel(kernel) -> None:
    """ValueError unless ``kernel`` is one of "torch", "triton", "auto" (or None: the default, see
    :func:`resolve_kernel`)."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be 'torch', 'triton' or 'auto', got {kernel!r}.")


def resolve_kernel(kernel: Optional[str] = None) -> str:
    """The kernel mode in force: ``kernel`` when given (an explicit argument always wins), else the environment
    variable MB_FUSED_KERNEL when set and not empty (a default for a quick A/B without editing a config), else
    "torch". ValueError for any other value than "torch", "triton", "auto" (case-insensitive env)."""
    if kernel is not None:
        check_kernel(kernel)
        return kernel
    env = os.environ.get("MB_FUSED_KERNEL", "").strip().lower()
    if env:
        if env not in KERNELS:
            raise ValueError(f"MB_FUSED_KERNEL must be 'auto', 'torch' or 'triton', got {env!r}.")
        return env
    return "torch"


def should_use(u: torch.Tensor, q, kernel: Optional[str] = None) -> bool:
    """Whether the op runs these kernels for head input ``u`` (q: the op's fp8 cache, None without fp8).

    Mode = :func:`resolve_kernel` (kernel) (MB_FUSED_KERNEL only when ``kernel`` is None). Never for fp8 (q is not
    None) or other dtypes than float32 / bfloat16 / float16. "torch" -> False; "triton" -> True
    (ValueError if Triton or CUDA is missing; CPU tensors are fine under TRITON_INTERPRET=1); "auto" ->
    True on CUDA when Triton is available. The op's default is "torch" until the kernels' GPU test
    (tests/kernels/test_ops_triton_kernels.py::test_triton_kernels_on_gpu) has passed on a GPU: they are verified
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


def _precision(u: torch.Tensor):
    """(input_precision, upcast) for tl.dot: IEEE fp32 for float32 (no TF32), the backend's default for
    16-bit inputs; see _mma for the upcast."""
    up = u.dtype == torch.bfloat16 and not u.is_cuda and _interpret()
    return ("ieee" if u.dtype == torch.float32 else None), up


def _config(kernel: str, x: torch.Tensor) -> Tuple[TileConfig, dict]:
    """(tile config, launch options) of ``kernel`` for tensor ``x`` (CUDA: its device's family)."""
    if not x.is_cuda:
        return tile_config(kernel, x.dtype, None), {}
    major, minor = torch.cuda.get_device_capability(x.device)
    cfg = tile_config(kernel, x.dtype, 10 * major + minor)
    return cfg, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)


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
    def _tanh(y):
        """tanh(y) in float32 from exp (no libdevice: the interpreter runs it too): sign(y) (1 - e) / (1 + e),
        e = exp(-2 |y|); absolute error ~1e-7."""
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(y < 0, -t, t)

    @triton.jit
    def _logit_tile(u_rows, w_cols, mask_t, mask_v, K, PREC: tl.constexpr, UP: tl.constexpr,
                    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """z [BT, BV] float32 = u[t-block] F[v-tile]^T, accumulated over k in BK pieces (edges masked to 0);
        rows of u and F contiguous along k."""
        offs_k0 = tl.arange(0, BK)
        z = tl.zeros((BT, BV), tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            a = tl.load(u_rows + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + offs_k[:, None], mask=mask_k[:, None] & mask_v[None, :], other=0.0)
            z = _mma(a, b, z, PREC, UP)
        return z

    @triton.jit
    def _lse_fwd_kernel(u_ptr, w_ptr, tgt_ptr, lse_ptr, lse2_ptr, zy_ptr, sz_ptr, bias_ptr, cw_ptr, T, K, n_real,
                        n_split, s_ut, s_wv, cap, WANT_P2: tl.constexpr, WANT_SUM: tl.constexpr,
                        HAS_CAP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
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
            z = _logit_tile(u_rows, w_cols, mask_t, mask_v, K, PREC, UP, BT, BV, BK)
            if HAS_BIAS:  # a = u F^T + bias, before the cap
                z += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
            if HAS_CAP:  # final-logit softcapping, x = c tanh(z / c)
                z = cap * _tanh(z / cap)
            zy += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)  # tgt < n_real
            if WANT_SUM:
                if HAS_W:  # sum_i w_i x_i (class weights)
                    wv = tl.load(cw_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
                    sz += tl.sum(tl.where(mask_v[None, :], z * wv[None, :], 0.0), axis=1)
                else:
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
    def _grad_logits_kernel(u_ptr, w_ptr, lse_ptr, coef_ptr, tgt_ptr, b_ptr, e_ptr, g_ptr, bias_ptr, cw_ptr, gb_ptr,
                            T, K, v0, vc, s_ut, s_wv, s_gt, cap, HAS_E: tl.constexpr, HAS_CAP: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr,
                            UP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
        """Gc[t, c] = G[t, v0 + c] for the chunk's columns c < vc (w_ptr, bias_ptr, cw_ptr point at row v0),
        rounded to Gc's dtype; zeros for token blocks without an active token. HAS_BIAS: also the float32 column
        sums of the tile's G into gb[pid_t, c] (the bias gradient's partial sums, summed over pid_t by torch)."""
        pid_t = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_t = pid_t * BT + tl.arange(0, BT)
        offs_c = pid_v * BV + tl.arange(0, BV)
        mask_t = offs_t < T
        mask_c = offs_c < vc
        t64 = offs_t.to(tl.int64)
        g_out = g_ptr + t64[:, None] * s_gt + offs_c[None, :]
        mask_g = mask_t[:, None] & mask_c[None, :]
        gb_out = gb_ptr + pid_t * vc + offs_c
        coef = tl.load(coef_ptr + offs_t, mask=mask_t, other=0.0)
        bt = tl.load(b_ptr + offs_t, mask=mask_t, other=0.0)
        act = tl.abs(coef) + tl.abs(bt)
        if HAS_E:
            et = tl.load(e_ptr + offs_t, mask=mask_t, other=0.0)
            act += tl.abs(et)
        if tl.max(act, axis=0) > 0:
            lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=float("inf"))  # rows t >= T: exp(z - lse) = 0
            tgt = tl.load(tgt_ptr + offs_t, mask=mask_t, other=-1)
            u_rows = u_ptr + t64[:, None] * s_ut
            w_cols = w_ptr + offs_c.to(tl.int64)[None, :] * s_wv
            z = _logit_tile(u_rows, w_cols, mask_t, mask_c, K, PREC, UP, BT, BV, BK)
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
            if HAS_CAP:
                th = _tanh(z / cap)
                z = cap * th
            # dL/dz in float32, one-hot and smoothing included, rounded once for the GEMMs
            p = coef[:, None] * tl.exp(z - lse[:, None])
            p -= tl.where((offs_c + v0)[None, :] == tgt[:, None], bt[:, None], 0.0)
            if HAS_E:
                if HAS_W:  # the smoothing term carries the class weight: e_t w_i
                    wc = tl.load(cw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                    p -= et[:, None] * wc[None, :]
                else:
                    p -= et[:, None]
            if HAS_CAP:  # through the cap: dx/dz = 1 - tanh^2
                p = p * (1.0 - th * th)
            if HAS_BIAS:  # dL/dbias = sum_t G, float32, before the rounding (rows t >= T: G = 0, see lse)
                tl.store(gb_out, tl.sum(p, axis=0), mask=mask_c)
            if UP:  # interpreter: round to nearest as a GPU's cast does (the interpreter's truncates)
                p = _round_bf16(p)
            tl.store(g_out, p.to(g_ptr.dtype.element_ty), mask=mask_g)
        else:
            tl.store(g_out, tl.zeros((BT, BV), g_ptr.dtype.element_ty), mask=mask_g)
            if HAS_BIAS:
                tl.store(gb_out, tl.zeros((BV,), tl.float32), mask=mask_c)

    @triton.jit
    def _mm_acc_kernel(a_ptr, b_ptr, c_ptr, M, N, KR, s_am, s_ak, s_bk, s_cm,
                       PREC: tl.constexpr, UP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr):
        """c [M, N] float32 += a [M, KR] @ b [KR, N] (b and c contiguous along N); one program per BM x BN
        tile of c, tiles in groups of GROUP_M rows of tiles (L2 reuse of b), no atomics."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        in_group = GROUP_M * n_n
        first_m = (pid // in_group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        mask_m = offs_m < M
        mask_n = offs_n < N
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * s_am + offs_k.to(tl.int64)[None, :] * s_ak
        b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * s_bk + offs_n[None, :]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, KR, BK):
            mask_k = offs_k < KR - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, PREC, UP)
            a_ptrs += BK * s_ak
            b_ptrs += BK * s_bk
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * s_cm + offs_n[None, :]
        mask_c = mask_m[:, None] & mask_n[None, :]
        tl.store(c_ptrs, tl.load(c_ptrs, mask=mask_c, other=0.0) + acc, mask=mask_c)


def grad_logits_block_n(cfg: TileConfig, extras: bool) -> int:
    """BV of ``_grad_logits_kernel``: the config's, halved for the bias / class-weight variant (HAS_BIAS or
    HAS_W) of a tile over 8192 elements (16-bit on sm90 / sm100, 128 x 128: the bias gradient's column sums and
    the weights' tile spilled 80-120 B on sm_90a with the cap; 128 x 64 spills none, ptxas -v)."""
    return cfg.block_n // 2 if extras and cfg.block_m * cfg.block_n > 8192 else cfg.block_n


def _prepare(u: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(u, weight) with unit stride along k, as the kernels read them (a copy only for a strided view:
    a transposed u; never for a parameter)."""
    if not available():
        raise RuntimeError("triton is not importable; use the torch path (kernel='torch').")
    if u.dtype not in _DTYPES or weight.dtype != u.dtype:
        raise ValueError(f"Triton LCE kernels take float32 / bfloat16 / float16 u and weight of one dtype, "
                         f"got {u.dtype} and {weight.dtype}.")
    return (u if u.stride(1) == 1 else u.contiguous()), (weight if weight.stride(1) == 1 else weight.contiguous())


def _num_splits(t_blocks: int, v_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(2, v_tiles)  # the interpreter: exercise the split combine, cheaply
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // t_blocks)  # about two programs per SM
    return max(1, min(want, v_tiles // 4 or 1))  # each split keeps >= 4 vocab tiles


def _no_target(t: int, device) -> torch.Tensor:
    return torch.full((t,), -1, dtype=torch.long, device=device)


def forward_stats(u: torch.Tensor, weight: torch.Tensor, n_real: int, want_p2: bool,
                  tgt: Optional[torch.Tensor] = None, want_sum: bool = False, softcap: Optional[float] = None,
                  bias: Optional[torch.Tensor] = None, class_weights: Optional[torch.Tensor] = None):
    """(lse [T], lse2 [T] or None, z_y [T], sum_z [T] or None), float32, over rows [0, n_real) of weight.

    tgt [T]: the local row of each token's target, -1 where it is not a real row here (None: all -1);
    z_y = z_{t, tgt_t} (0 for -1). lse / lse2 are -inf where n_real == 0. See the module docstring.
    softcap: c (None: none): every quantity is of the capped logits x = c tanh(z / c) (lse2 then is NOT the
    probe's d-weighted sum: the op runs the torch loop when it needs statistics under a cap). bias [>= n_real]:
    added to the logits before the cap (a = u F^T + bias). class_weights [n_real] float32: sum_z is then
    sum_i w_i x_i (lse2 stays unweighted: the op runs the torch loop for statistics with class weights)."""
    u, weight = _prepare(u, weight)
    t, k = u.shape
    z_y = torch.zeros(t, dtype=torch.float32, device=u.device)
    sum_z = torch.zeros_like(z_y) if want_sum else None
    if n_real == 0 or t == 0:
        m = torch.full((t,), float("-inf"), dtype=torch.float32, device=u.device)
        return m, (m.clone() if want_p2 else None), z_y, sum_z
    tgt = (_no_target(t, u.device) if tgt is None else tgt).contiguous()
    cfg, opts = _config("lse_fwd", u)
    t_blocks, v_tiles = triton.cdiv(t, cfg.block_m), triton.cdiv(n_real, cfg.block_n)
    n_split = _num_splits(t_blocks, v_tiles, u.device)
    lse = torch.empty((n_split, t), dtype=torch.float32, device=u.device)
    lse2 = torch.empty_like(lse) if want_p2 else lse
    zy = torch.empty_like(lse)
    sz = torch.empty_like(lse) if want_sum else zy
    prec, up = _precision(u)
    bias_c = lse if bias is None else bias.contiguous()
    cw = lse if class_weights is None else class_weights.to(torch.float32).contiguous()
    _lse_fwd_kernel[(t_blocks, n_split)](
        u, weight, tgt, lse, lse2, zy, sz, bias_c, cw, t, k, n_real, n_split, u.stride(0), weight.stride(0),
        float(softcap or 1.0), WANT_P2=bool(want_p2), WANT_SUM=bool(want_sum), HAS_CAP=softcap is not None,
        HAS_BIAS=bias is not None, HAS_W=class_weights is not None, PREC=prec, UP=up, BT=cfg.block_m,
        BV=cfg.block_n, BK=cfg.block_k, **opts)
    if n_split == 1:
        return lse[0], (lse2[0] if want_p2 else None), zy[0], (sz[0] if want_sum else None)
    return (torch.logsumexp(lse, 0), (torch.logsumexp(lse2, 0) if want_p2 else None), zy.sum(0),
            (sz.sum(0) if want_sum else None))


def _mm_acc(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, prec, up) -> None:
    """c [M, N] float32 += a [M, R] @ b [R, N] with ``_mm_acc_kernel`` (a: any strides; b, c: unit stride
    along N)."""
    (m, r), n = a.shape, b.shape[1]
    cfg, opts = _config("mm_acc", a)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _mm_acc_kernel[grid](a, b, c, m, n, r, a.stride(0), a.stride(1), b.stride(0), c.stride(0), PREC=prec, UP=up,
                         BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=8, **opts)


def backward_chunks(u: torch.Tensor, weight: torch.Tensor, n_real: int, lse: torch.Tensor, coef: torch.Tensor,
                    grad_u: torch.Tensor, grad_w: torch.Tensor, tgt: Optional[torch.Tensor] = None,
                    b: Optional[torch.Tensor] = None, e: Optional[torch.Tensor] = None,
                    chunk: Optional[int] = None, softcap: Optional[float] = None, bias: Optional[torch.Tensor] = None,
                    class_weights: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None) -> None:
    """grad_u [T, k] += G F[:n_real]; grad_w[:n_real] += G^T u (both float32), with
    G = coef exp(z - lse) - b [i = tgt] - e formed in float32 in the kernel (b, e [T]; None: 0).

    chunk: vocab rows per pass (None: all n_real); a [T, chunk] buffer of u's dtype holds G rounded to
    u's dtype. Three launches per chunk, no atomics (see the module docstring). softcap: c (None: none):
    G = (coef exp(x - lse) - b [i = tgt] - e) (1 - (x / c)^2) with x = c tanh(z / c). bias [>= n_real]: added to
    the logits before the cap; grad_bias [>= n_real] float32 += sum_t G (float32 partial sums per token block,
    summed in a fixed order: deterministic). class_weights [n_real]: the smoothing term is e_t w_i."""
    u, weight = _prepare(u, weight)
    t, k = u.shape
    if n_real == 0 or t == 0:
        return
    if grad_u.dtype != torch.float32 or grad_u.shape != u.shape:
        raise ValueError(f"grad_u must be float32 {tuple(u.shape)}, got {grad_u.dtype} {tuple(grad_u.shape)}.")
    if grad_w.dtype != torch.float32 or grad_w.shape[0] < n_real or grad_w.shape[1] != k:
        raise ValueError(f"grad_w must be float32 [>= {n_real}, {k}], got {grad_w.dtype} {tuple(grad_w.shape)}.")
    if grad_u.stride(1) != 1 or grad_w.stride(1) != 1:
        raise ValueError(f"grad_u and grad_w need unit stride along k, got strides {grad_u.stride()} and "
                         f"{grad_w.stride()}.")
    lse = lse.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    tgt = (_no_target(t, u.device) if tgt is None else tgt).contiguous()
    b = (torch.zeros_like(coef) if b is None else b.to(torch.float32)).contiguous()
    has_e = e is not None
    e = e.to(torch.float32).contiguous() if has_e else b
    prec, up = _precision(u)
    cfg, opts = _config("grad_logits", u)
    c = n_real if chunk is None else max(1, min(int(chunk), n_real))
    c = min(-(-c // 16) * 16, -(-n_real // 16) * 16)  # a multiple of 16: aligned rows of the buffer
    g = torch.empty((t, c), dtype=u.dtype, device=u.device)
    t_blocks = triton.cdiv(t, cfg.block_m)
    has_bias = bias is not None
    if has_bias and (grad_bias is None or grad_bias.dtype != torch.float32):
        raise ValueError("a bias needs grad_bias, a float32 [>= n_real] buffer.")
    gb = torch.empty((t_blocks, c), dtype=torch.float32, device=u.device) if has_bias else lse
    cw = None if class_weights is None else class_weights.to(torch.float32).contiguous()
    bv = grad_logits_block_n(cfg, has_bias or cw is not None)
    for v0 in range(0, n_real, c):
        vc = min(c, n_real - v0)
        w_c = weight[v0:v0 + vc]
        bias_c = bias[v0:v0 + vc] if has_bias else lse
        cw_c = cw[v0:v0 + vc] if cw is not None else lse
        _grad_logits_kernel[(t_blocks, triton.cdiv(vc, bv))](
            u, w_c, lse, coef, tgt, b, e, g, bias_c, cw_c, gb, t, k, v0, vc, u.stride(0), w_c.stride(0), g.stride(0),
            float(softcap or 1.0), HAS_E=has_e, HAS_CAP=softcap is not None, HAS_BIAS=has_bias,
            HAS_W=cw is not None, PREC=prec, UP=up, BT=cfg.block_m, BV=bv, BK=cfg.block_k, **opts)
        if has_bias:
            grad_bias[v0:v0 + vc] += gb.view(-1)[:t_blocks * vc].view(t_blocks, vc).sum(0)  # rows of vc
        g_c = g[:, :vc]
        _mm_acc(g_c, w_c, grad_u, prec, up)  # dU pass: grad_u += Gc F_c
        _mm_acc(g_c.t(), u, grad_w[v0:v0 + vc], prec, up)  # dW pass: grad_w[chunk] += Gc^T u


# ----------------------------------------------------------------------------- compile without a GPU
def _ptxas() -> Optional[str]:
    """The wheel's ptxas that reads Triton's PTX (ptxas-blackwell where shipped), None without one."""
    if triton is None:
        return None
    try:
        from triton.backends import nvidia
    except ImportError:
        return None
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
        if os.access(path, os.X_OK):
            return path
    return None


def compile_unavailable() -> Optional[str]:
    """None when this Triton can compile for NVIDIA GPUs without one and has a ptxas to read the result
    back; else the reason (a sentence)."""
    if triton is None:
        return "triton is not importable"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends import nvidia  # noqa: F401
    except ImportError as err:
        return f"this triton has no NVIDIA backend ({err})"
    if _ptxas() is None:
        return "this triton wheel ships no ptxas"
    return None


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def inspect_kernel(fn, signature: dict, constexprs: dict, divisible: tuple, capability: int, num_warps: int,
                   num_stages: int) -> dict:
    """Compile the @triton.jit ``fn`` for an NVIDIA GPU of ``capability`` (80, 90, 100, ...) without a GPU
    and read its resources back: {"target" (the PTX target), "registers", "spill_bytes" (spill stores per thread),
    "spill_load_bytes", "stack_bytes", "shared_bytes" (Triton's metadata.shared, per block)}.

    signature: argument name -> Triton type ("*bf16", "i32", "constexpr"); constexprs: name -> value;
    divisible: the argument names a launch would mark as multiples of 16 (aligned pointers, sizes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    ptx = k.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    frame, regs = _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
    return {"target": arch, "registers": int(regs.group(1)), "spill_bytes": int(frame.group(2)),
            "spill_load_bytes": int(frame.group(3)), "stack_bytes": int(frame.group(1)),
            "shared_bytes": int(k.metadata.shared)}


def _compile_specs(dt: str, cap: bool = False, extras: bool = False):
    """The kernels as :func:`forward_stats` / :func:`backward_chunks` launch them for contiguous inputs of
    dtype ``dt`` ("fp32" | "bf16" | "fp16") at realistic sizes (T, k, V_local and the chunk multiples of
    16): [(report name, config kernel, fn, signature, constexprs, divisible)]. ``cap``: only the softcap
    variants (HAS_CAP) of the two logit kernels; ``extras``: only their bias + class-weight variants (HAS_BIAS,
    HAS_W; with ``cap`` as well, all three). The unit strides along k
    are built into the kernels; the dU / dW GEMMs read Gc row- / column-major (Triton specializes the
    stride 1 at a launch, as here)."""
    x, f32 = "*" + dt, "*fp32"
    prec = "ieee" if dt == "fp32" else None
    fwd_sig = dict(u_ptr=x, w_ptr=x, tgt_ptr="*i64", lse_ptr=f32, lse2_ptr=f32, zy_ptr=f32, sz_ptr=f32, bias_ptr=x,
                   cw_ptr=f32, T="i32", K="i32", n_real="i32", n_split="i32", s_ut="i32", s_wv="i32", cap="fp32")
    fwd_const = dict(WANT_P2=True, WANT_SUM=True, HAS_CAP=cap, HAS_BIAS=extras, HAS_W=extras, PREC=prec, UP=False)
    fwd_div = ("u_ptr", "w_ptr", "tgt_ptr", "lse_ptr", "lse2_ptr", "zy_ptr", "sz_ptr", "T", "K", "n_real", "s_ut",
               "s_wv")
    gl_sig = dict(u_ptr=x, w_ptr=x, lse_ptr=f32, coef_ptr=f32, tgt_ptr="*i64", b_ptr=f32, e_ptr=f32, g_ptr=x,
                  bias_ptr=x, cw_ptr=f32, gb_ptr=f32, T="i32", K="i32", v0="i32", vc="i32", s_ut="i32", s_wv="i32",
                  s_gt="i32", cap="fp32")
    gl_const = dict(HAS_E=True, HAS_CAP=cap, HAS_BIAS=extras, HAS_W=extras, PREC=prec, UP=False)
    gl_div = ("u_ptr", "w_ptr", "lse_ptr", "coef_ptr", "tgt_ptr", "b_ptr", "e_ptr", "g_ptr", "T", "K", "v0", "vc",
              "s_ut", "s_wv", "s_gt")
    mm_sig = dict(a_ptr=x, b_ptr=x, c_ptr=f32, M="i32", N="i32", KR="i32", s_am="i32", s_ak="i32", s_bk="i32",
                  s_cm="i32")
    mm_div = ("a_ptr", "b_ptr", "c_ptr", "M", "N", "KR", "s_bk", "s_cm")
    du_sig, dw_sig = dict(mm_sig, s_ak="constexpr"), dict(mm_sig, s_am="constexpr")
    mm_const = dict(PREC=prec, UP=False, GROUP_M=8)
    logit_kernels = [("lse_fwd", "lse_fwd", _lse_fwd_kernel, fwd_sig, fwd_const, fwd_div),
                     ("grad_logits", "grad_logits", _grad_logits_kernel, gl_sig, gl_const, gl_div)]
    if cap or extras:  # the GEMM kernels have no cap / bias / class-weight variant
        return logit_kernels
    return [*logit_kernels,
            ("mm_acc dU (Gc @ F)", "mm_acc", _mm_acc_kernel, du_sig, dict(mm_const, s_ak=1), mm_div + ("s_am",)),
            ("mm_acc dW (Gc^T @ u)", "mm_acc", _mm_acc_kernel, dw_sig, dict(mm_const, s_am=1), mm_div + ("s_ak",))]


def compile_resources(dtypes=("bf16", "fp16", "fp32"), archs=tuple(ARCHS), configs=None,
                      softcap: bool = False, extras: bool = False) -> List[dict]:
    """Every kernel of this module compiled at its shipped configuration (or ``configs``, a dict like
    :data:`CONFIGS`) for each arch of :data:`ARCHS` and input dtype, without a GPU: one row per kernel x
    dtype x arch (``softcap`` / ``extras``: the two logit kernels' softcap / bias + class-weight variants only),
    :func:`inspect_kernel`'s figures
    plus "kernel", "dtype", "shared_limit" (the family's,
    :data:`SHARED_LIMIT`) and the configuration (block_m, block_n, block_k, num_warps, num_stages)."""
    reason = compile_unavailable()
    if reason:
        raise RuntimeError(f"cannot compile Triton kernels here: {reason}.")
    configs = CONFIGS if configs is None else configs
    rows = []
    for dt in dtypes:
        for name, cfg_name, fn, sig, const, div in _compile_specs(dt, softcap, extras):
            for arch in archs:
                cap, fam = ARCHS[arch]
                cfg = configs[(cfg_name, dt, fam)]
                bv = grad_logits_block_n(cfg, extras) if cfg_name == "grad_logits" else cfg.block_n
                tiles = ({"BM": cfg.block_m, "BN": cfg.block_n, "BK": cfg.block_k} if cfg_name == "mm_acc" else
                         {"BT": cfg.block_m, "BV": bv, "BK": cfg.block_k})
                info = inspect_kernel(fn, {**sig, **{t: "constexpr" for t in (*const, *tiles)}},
                                      {**const, **tiles}, div, cap, cfg.num_warps, cfg.num_stages)
                rows.append({"kernel": name, "dtype": dt, "arch": arch, **info, "shared_limit": SHARED_LIMIT[fam],
                             **dataclasses.asdict(cfg), **({"block_n": bv} if cfg_name != "mm_acc" else {})})
    return rows
