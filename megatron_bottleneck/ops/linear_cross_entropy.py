"""Fused LM head + vocab-parallel cross-entropy that never materialises the T x V logits.

Notation: T tokens, k the head input width (k = r for a low-rank head's U = H B^T, k = D for a dense
head's H), V the real (unpadded) vocabulary, weight = this rank's vocab shard F (V_local x k) whose
row 0 is global class ``vocab_start``; rows at global index >= V are padding and take no part in the
softmax (their logits are treated as -inf, their weight gradient is 0).

Per token t with logits z_t = F_all u_t (over the real classes only), lse_t = log sum_i exp(z_ti),
p = softmax(z_t), label y_t, label smoothing alpha, s = alpha V / (V - 1), z-loss weight w::

    loss_t = lse_t - (1 - s) z_{t,y} - s mean_i z_ti + w lse_t^2
           = (1 - s)(lse_t - z_ty) - s mean_i log p_ti + w lse_t^2      (Megatron's smoothing, K = V)
    dloss_t/dz_ti = (1 + 2 w lse_t) p_ti - (1 - s) [i = y_t] - s / V

and loss_t = 0, gradient 0, where y_t == ignore_index. This is the default of the options; with all of them
(a bias, the softcap x = c tanh(a / c) applied before everything else, class weights w, torch's smoothing
convention eps = alpha, reductions) the per-token loss and dL/dz are those of
:mod:`megatron_bottleneck.base.loss_spec`, whose functions the loops below call (``token_loss``,
``grad_terms``, ``logit_grad_``): one implementation shared with the heads' materialised loss and the probe.

Against Megatron's ``vocab_parallel_cross_entropy``: equal (loss and gradients, tested) without padding
at any TP size when alpha = 0, and at TP = 1 with smoothing. Two deliberate differences: (1) padded
classes are excluded here, while Megatron keeps them in the softmax; (2) with smoothing under TP > 1,
Megatron uses the local shard size V/tp for K and the local mean of log p (so its loss depends on the
TP size); here K = V and the mean is over all V real classes, the TP = 1 value at every TP size. The classes are split over the TP group; each
rank walks its shard in vocab chunks of ``chunk_size`` rows (online log-sum-exp; the same pass gathers
z_{t,y} and, with smoothing, sum_i z_ti from the float32 chunk logits), then one MAX and one SUM
all-reduce (over [T]-sized vectors, never V-sized) combine the ranks, as Megatron's
``vocab_parallel_cross_entropy`` does. Backward recomputes each chunk's logits and forms, in float32,

    (g_z)_chunk = coef_t exp(z - lse_t) - (1 - s) g_t [i = y_t] - g_t s / V      [T, C]
    coef_t = g_t (1 + 2 w lse_t),   g_t = dL/dloss_t (0 for ignored tokens)

(the one-hot term only where y_t falls in the chunk, a scatter on the chunk) BEFORE the two gradient GEMMs

    dL/du += (g_z)_chunk F_chunk        [T, k]   (this rank's partial sum, see below)
    dL/dF_chunk += (g_z)_chunk^T u      [C, k]

as Liger-Kernel and cut-cross-entropy do: p_y u and u never cancel after rounding. For 16-bit inputs the
float32 chunk is rounded to the input dtype for the two gradient GEMMs, and all three GEMMs (logits, dL/du,
dL/dF) keep float32 results: the 16-bit products are summed in float32 within a chunk and across chunks,
and each gradient is rounded to 16 bits once, at the end. Where torch has float32-output 16-bit GEMMs
(:func:`fp32_output_mm`: ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32``, CUDA builds of
torch >= 2.8) they run as such; elsewhere (CPUs) the op emulates them exactly: u is upcast to float32 once
per pass ([T, k]), each weight chunk into a float32 [C, k] buffer, the rounded logit gradient is used as
float32, and the GEMMs run in float32. A product of two 16-bit numbers is exact in float32, so both ways
compute the same sums, up to summation order: a CPU test of the 16-bit numerics tests the GPU's. (Before,
a CPU rounded each chunk's 16-bit partial product of dL/du to 16 bits before the float32 sum: a second
rounding that made dL/du up to 1.4x (bf16) and 1.8x (fp16) less accurate than the unfused path on flat
logits once the vocabulary was chunked.) The decision is made once per call from the torch build and the
device, never by catching an error: an out-of-memory error stays one. With fp8 the float32 chunk is
quantised to e5m2 (one-hot term included). dL/du and dL/dF are accumulated in float32 buffers and cast
to the input dtype once at the end (or dL/dF is added into ``weight.main_grad``, see
``weight_grad_into_main_grad``). Nothing V_local x k besides dL/dF is allocated, and no [T, C] tensor
besides the chunk buffer (and its 16-bit cast). The op makes no host synchronisation in forward or backward
(``check_labels=True`` makes one, before the op).

Chunk size: C vocabulary rows per chunk so that two float32 [T, C] tensors fit the memory budget
(:func:`choose_chunk_size`); the default budget (:func:`memory_budget_for`) is 16 MiB on a CPU and, on a GPU,
the power of two at or below 1/8 of the free memory, between 1 and 4 GiB. Each chunk costs a fixed number
of kernel launches (about 20 per pass, see ``bench/head_loss.py``), so the chunk count is the launch count.

TP contract for dL/du: by default the op returns this rank's partial sum over its vocab shard, like a
``ColumnParallelLinear`` without its input region: the caller wraps u in Megatron's
``copy_to_tensor_model_parallel_region`` (or, under sequence parallelism, gets u from
``gather_from_sequence_parallel_region``), whose backward all-reduces (reduce-scatters) it. That is what
:class:`~megatron_bottleneck.heads.low_rank.LowRankOutputLayer` already does for U. Standalone callers
pass ``reduce_grad_input=True`` and the op all-reduces dL/du itself.

Kernels: :func:`_forward_chunks` and :func:`_backward_chunks` are the only loops (u, F, lse, coef, targets ->
lse_local, z_y, sum_z; dU, dF). The Triton kernels of :mod:`.triton_linear_cross_entropy` replace them with
the same inputs and outputs (float32 / bfloat16 / float16, not fp8); their backward holds one [T, C] dL/dz
chunk in the input dtype (C: this op's chunk), no atomics.
The choice is the ``kernel`` argument ("torch", the default; "triton"; "auto" = Triton on CUDA when it
imports); the environment variable ``MB_FUSED_KERNEL``, when set and not empty, overrides the argument
(see :func:`.triton_linear_cross_entropy.resolve_kernel`). The default stays "torch" until the kernels'
GPU test has passed on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..base.loss import HeadLossStats
from ..base.loss_spec import (LossSpec, class_weights, grad_terms, reduce_token_loss, softcap_, softcap_slope,
                              target_weights, token_loss)
from ..base.loss_spec import logit_grad_ as _spec_logit_grad_
from . import fp8 as fp8_ops
from . import triton_linear_cross_entropy as triton_lce
from ..base.groups import group_rank, group_size

CPU_MEMORY_BUDGET = 16 * 2**20  # CPUs: a smaller [T, C] chunk stays nearer the caches
GPU_MEMORY_BUDGET_MIN = 2**30  # GPUs: at least 1 GiB ...
GPU_MEMORY_BUDGET_MAX = 4 * 2**30  # ... at most 4 GiB ...
GPU_FREE_MEMORY_SHARE = 8  # ... else the power of two at or below 1/8 of the free memory
_MIN_CHUNK = 16
_16BIT = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- device decisions
def memory_budget_for(device_type: str, free_bytes: Optional[int] = None) -> int:
    """The op's default ``memory_budget_bytes`` on a device of type ``device_type`` with ``free_bytes`` free.

    * ``"cpu"``: 16 MiB (:data:`CPU_MEMORY_BUDGET`). Measured (bench/head_loss.py, T=4096, r=64, V=49152,
      fp32, one CPU core): ~15% faster than 64 MiB and 22 instead of 46 MiB of working memory.
    * any other device (GPUs): ``clamp(2^floor(log2(free_bytes / 8)), 1 GiB, 4 GiB)``: the power of two at
      or below an eighth of the free memory, at least 1 GiB and at most 4 GiB; 1 GiB when ``free_bytes`` is
      unknown (None). The power of two keeps the chunk size, hence the numerics, the same from step to step
      while free memory drifts. At T tokens the chunk is C = budget / (8 T) vocabulary rows
      (:func:`choose_chunk_size`): at T = 32k, 1 GiB is 4096 rows (32 chunks of V/tp = 128k), 4 GiB 16384
      rows (8 chunks), against 256 rows (500 chunks) with the former 64 MiB.

    A pure function (no device query): :func:`default_memory_budget` supplies ``free_bytes``.
    """
    if device_type == "cpu":
        return CPU_MEMORY_BUDGET
    if free_bytes is None:
        return GPU_MEMORY_BUDGET_MIN
    share = max(0, int(free_bytes)) // GPU_FREE_MEMORY_SHARE
    pow2 = 1 << (share.bit_length() - 1) if share > 0 else 0
    return min(GPU_MEMORY_BUDGET_MAX, max(GPU_MEMORY_BUDGET_MIN, pow2))


def default_memory_budget(device: torch.device) -> int:
    """:func:`memory_budget_for` of ``device``: 16 MiB on a CPU; on a CUDA device from its free memory, the
    driver's (``torch.cuda.mem_get_info``) plus what torch's caching allocator holds unused (reserved -
    allocated): between 1 and 4 GiB; 1 GiB on other devices. ``mem_get_info`` is a driver query, not a
    stream synchronisation; the op calls this once per call (forward and backward share the decision)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return memory_budget_for(dev.type)
    free, _total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return memory_budget_for("cuda", free)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "xpu": "XPU", "mps": "MPS", "hpu": "HPU"}


def _build_has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether this torch build registers a kernel of ``aten::<op>`` (e.g. "mm.dtype_out") for the dispatch
    key (e.g. "CUDA"): False when the overload does not exist (older torch) or has no such kernel."""
    name, overload = op.split(".")
    key = getattr(torch._C.DispatchKey, dispatch_key, None)
    packet = getattr(torch.ops.aten, name)
    fn = getattr(packet, overload, None) if overload in packet.overloads() else None
    return key is not None and fn is not None and bool(fn.has_kernel_for_dispatch_key(key))


def fp32_output_mm(device_type: str, has_kernel=_build_has_kernel) -> bool:
    """Whether 16-bit GEMMs can write float32 results on ``device_type``: ``torch.mm(a, b, out_dtype=
    torch.float32)`` and ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` for bfloat16 / float16 a, b
    (float32 accumulation, one rounding of the result to float32, none to 16 bits).

    Decided from the torch build, by feature: true when the build registers kernels of ``aten::mm.dtype_out``
    and ``aten::addmm.dtype_out`` (torch >= 2.8) for the device's dispatch key. CUDA builds of torch >= 2.8
    have them for "cuda" (and "meta"); no build has them for "cpu" (torch 2.13, 2.14). ``has_kernel(op, key)``
    answers the registry question (tests pass a fake). Never decided by catching an error: an OOM in a GEMM
    is an OOM. Where this is False the op emulates the float32-output GEMM exactly (see the module
    docstring: operands upcast to float32, products of 16-bit numbers are exact in float32)."""
    key = _DISPATCH_KEYS.get(device_type, device_type.upper())
    return has_kernel("mm.dtype_out", key) and has_kernel("addmm.dtype_out", key)


@dataclass(frozen=True)
class ChunkLoopPlan:
    """How the torch chunk loop runs for one call, decided once before the forward pass (the backward
    reuses it from the autograd context): the memory budget (bytes) and whether 16-bit GEMMs write float32
    (:func:`fp32_output_mm`)."""

    memory_budget_bytes: int
    fp32_output_mm: bool

    @classmethod
    def for_device(cls, device: torch.device, memory_budget_bytes: Optional[int] = None) -> "ChunkLoopPlan":
        dev = torch.device(device)
        budget = default_memory_budget(dev) if memory_budget_bytes is None else int(memory_budget_bytes)
        return cls(budget, fp32_output_mm(dev.type))


def choose_chunk_size(num_tokens: int, num_rows: int, memory_budget_bytes: int, row_bytes: int = 0) -> int:
    """Vocab rows per chunk C so that 2 float32 [T, C] tensors (and ``row_bytes`` per row) fit
    ``memory_budget_bytes``: C = budget // (8 T + row_bytes).

    The op holds one such buffer (forward and backward each) and a 16-bit [T, C] cast of it for 16-bit
    inputs; the rest of the budget covers the fp8 path's casts. ``row_bytes`` = 4 k where 16-bit inputs run
    without :func:`fp32_output_mm` (CPUs): the float32 [C, k] copy of the weight chunk (:func:`chunk_row_bytes`).
    A multiple of 16 (FP8 GEMMs and tensor cores want it), at least 16, at most ``num_rows``. The [T, k] and
    [V_local, k] gradients come on top (they are outputs), and, without :func:`fp32_output_mm`, a float32
    [T, k] copy of 16-bit u.
    """
    c = int(memory_budget_bytes) // max(1, 8 * num_tokens + int(row_bytes))
    c = max(_MIN_CHUNK, c - c % _MIN_CHUNK)
    return max(1, min(c, num_rows))


def chunk_row_bytes(dtype: torch.dtype, width: int, fp32_out: bool) -> int:
    """Working bytes per vocabulary row of a chunk besides the [T, C] buffers: 4 k (the float32 copy of a
    weight row) for 16-bit (or float64) inputs without float32-output GEMMs, else 0."""
    return 4 * int(width) if dtype != torch.float32 and not (dtype in _16BIT and fp32_out) else 0


def chunk_count(num_tokens: int, num_rows: int, memory_budget_bytes: int, row_bytes: int = 0) -> int:
    """Vocabulary chunks per pass of the torch loop (forward; the backward walks as many):
    ceil(num_rows / :func:`choose_chunk_size`)."""
    if num_rows <= 0:
        return 0
    c = choose_chunk_size(num_tokens, num_rows, memory_budget_bytes, row_bytes)
    return -(-num_rows // c)


class _Gemms:
    """The chunk loop's GEMMs for head input u [T, k] and weight [V_local, k], float32 results.

    Modes: "fp32" (float32 operands: torch.mm / addmm_); "out_dtype" (16-bit operands, float32 output and
    accumulation: ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32``, see :func:`fp32_output_mm`);
    "upcast" (other 16-bit cases, and float64: the operands are cast to float32 and multiplied in float32:
    u once per pass ([T, k], the size of dL/du's accumulator), each weight chunk into one [C, k] buffer, and
    the logit gradient is used as float32 after its rounding to u's dtype). Products of two 16-bit numbers
    are exact in float32 (8 + 8 or 11 + 11 significant bits), so "upcast" computes what "out_dtype" computes,
    up to the GEMMs' summation order: one rounding per result, none to 16 bits between chunks.
    """

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, chunk: int, fp32_out: bool):
        self.u, self.weight = u, weight
        if u.dtype == torch.float32:
            self.mode = "fp32"
        elif u.dtype in _16BIT and fp32_out:
            self.mode = "out_dtype"
        else:
            self.mode = "upcast"
        if self.mode == "upcast":
            self.u32 = u.float()
            self.wbuf = torch.empty(min(chunk, weight.shape[0]) * weight.shape[1], dtype=torch.float32,
                                    device=u.device)

    def weight_rows(self, c0: int, c1: int) -> torch.Tensor:
        """Rows c0:c1 of the weight as the GEMMs take them (float32 copy in "upcast" mode)."""
        w = self.weight[c0:c1]
        if self.mode != "upcast":
            return w
        return self.wbuf[: w.numel()].view(w.shape).copy_(w)

    def logits(self, w_c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [T, C] = u w_c^T, float32."""
        if self.mode == "fp32":
            return torch.mm(self.u, w_c.t(), out=out)
        if self.mode == "out_dtype":
            return torch.mm(self.u, w_c.t(), out_dtype=torch.float32, out=out)
        return torch.mm(self.u32, w_c.t(), out=out)

    def add_grads(self, g: torch.Tensor, low: Optional[torch.Tensor], w_c: torch.Tensor, grad_u: torch.Tensor,
                  grad_w_c: torch.Tensor) -> None:
        """grad_u += G w_c and grad_w_c += G^T u (float32 accumulators) for the float32 logit gradient G
        [T, C] (overwritten in "upcast" mode), rounded to u's dtype first for 16-bit u (``low``: a [T, C]
        buffer of u's dtype)."""
        if self.mode == "fp32":
            grad_u.addmm_(g, w_c)
            grad_w_c.addmm_(g.t(), self.u)
            return
        if self.mode == "out_dtype":
            gl = low.copy_(g)
            torch.addmm(grad_u, gl, w_c, out_dtype=torch.float32, out=grad_u)
            torch.addmm(grad_w_c, gl.t(), self.u, out_dtype=torch.float32, out=grad_w_c)
            return
        if low is not None:  # round G to u's 16-bit dtype, as the GEMM operand it is on a GPU
            g.copy_(low.copy_(g))
        grad_u.addmm_(g, w_c)
        grad_w_c.addmm_(g.t(), self.u32)


class _Fp8Cache:
    """u and F quantised once per call (e4m3, per-tensor scales); F padded to a multiple of 16 rows."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor, n_real: int):
        self.u8, self.su = fp8_ops.quantize(u, fp8_ops.E4M3)
        w = weight[:n_real]
        pad = (-n_real) % 16
        if pad:
            w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
        self.w8, self.sw = fp8_ops.quantize(w, fp8_ops.E4M3)

    def logits(self, c0: int, c1: int) -> torch.Tensor:
        """float32 [T, C16] logits of rows c0:c1 rounded up to a multiple of 16 (extra columns = 0)."""
        c1p = c0 + (c1 - c0 + 15) // 16 * 16
        return fp8_ops.scaled_matmul(self.u8, self.w8[c0:c1p].t(), scale_a=self.su, scale_b=self.sw)


def _chunk_logits(gemms: Optional[_Gemms], c0, c1, q: Optional[_Fp8Cache], buf: torch.Tensor, t: int):
    """(float32 logits [T, c1 - c0] of rows c0:c1, the weight rows as the GEMMs take them), the logits
    written into (a view of) the flat buffer ``buf``.

    One buffer serves every chunk: a fresh T x C allocation per chunk costs page faults comparable to
    the chunk's exp pass (CPU), or allocator traffic (GPU). ``gemms`` is None with fp8 (``q``); t = T."""
    c = c1 - c0
    z = buf[: t * c].view(t, c)
    if q is not None:
        z.copy_(q.logits(c0, c1)[:, :c])
        return z, None
    w_c = gemms.weight_rows(c0, c1)
    return gemms.logits(w_c, z), w_c


def _low_buffer(u: torch.Tensor, t: int, chunk: int, q) -> Optional[torch.Tensor]:
    """The flat 16-bit [T, C] buffer of the logit gradient's cast (None for float32, float64 and fp8)."""
    if q is not None or u.dtype not in _16BIT:
        return None
    return torch.empty(t * chunk, dtype=u.dtype, device=u.device)


def _target_hits(tgt: torch.Tensor, c0: int, c: int):
    """(column of y_t in chunk [c0, c0 + c) clamped into it [T, 1], whether it is there [T])."""
    j = tgt - c0
    return j.clamp(0, c - 1).unsqueeze(1), (j >= 0) & (j < c)


def _forward_chunks(u, weight, n_real, chunk, want_p2, q, tgt=None, want_sum=False, fp32_out=None, *,
                    cap=None, w_local=None, bias=None, moments=None):
    """Local online log-sum-exp over rows [0, n_real) of weight, and the target / sum logits.

    tgt [T] (int): the local row of y_t, or -1 where y_t is not a real row of this shard (None: all -1).
    Logits x = c tanh(a / c) of a = u F^T (+ ``bias``) with the cap c = ``cap`` (None: x = a).
    Returns (lse [T], lse2 [T] or None, z_y [T], sum_z [T] or None), float32: lse = log sum_i exp(x_i)
    (-inf where n_real == 0), lse2 = log sum_i d_i^2 exp(2 x_i) if ``want_p2`` (d_i = 1 - (x_i / c)^2, 1 without
    a cap), z_y = x_{t, tgt_t} (0 where tgt_t = -1), sum_z = sum_i w_i x_ti if ``want_sum`` (w = ``w_local``, the
    shard's class weights [n_real]; None: 1); all from the same float32 chunk logits. ``moments`` (a dict, with
    ``want_p2``): filled with "lspw" = log sum_i d_i^2 w_i exp(x_i) and "s_ww" = sum_i d_i^2 w_i^2 ([T]).
    Per chunk: m' = max(m, max_i x_i); S <- S e^(m - m') + sum_i e^(x_i - m'); S2 likewise with squares.
    ``fp32_out``: :func:`fp32_output_mm` of u's device (None: decided here); see :class:`_Gemms`.
    """
    t = u.shape[0]
    m = torch.full((t,), float("-inf"), dtype=torch.float32, device=u.device)
    s1 = torch.zeros_like(m)
    s2 = torch.zeros_like(m) if want_p2 else None
    z_y = torch.zeros_like(m)
    sum_z = torch.zeros_like(m) if want_sum else None
    full = moments is not None and want_p2 and (cap is not None or w_local is not None)
    spw = torch.zeros_like(m) if full else None
    sww = torch.zeros_like(m) if full else None
    if n_real == 0:
        if moments is not None and want_p2:
            moments.update(lspw=m.clone(), s_ww=torch.zeros_like(m))
        return m, (m.clone() if want_p2 else None), z_y, sum_z
    if tgt is None:
        tgt = torch.full((t,), -1, dtype=torch.long, device=u.device)
    c_max = min(chunk, n_real)
    buf = torch.empty(t * c_max, dtype=torch.float32, device=u.device)
    dbuf = torch.empty(t * c_max, dtype=torch.float32, device=u.device) if (want_p2 and cap is not None) else None
    if fp32_out is None:
        fp32_out = fp32_output_mm(u.device.type)
    gemms = _Gemms(u, weight, c_max, fp32_out) if q is None else None
    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        z, _ = _chunk_logits(gemms, c0, c1, q, buf, t)
        if bias is not None:
            z.add_(bias[c0:c1].float())
        softcap_(z, cap)
        w_c = None if w_local is None else w_local[c0:c1]
        col, hit = _target_hits(tgt, c0, z.shape[1])
        z_y += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        if want_sum:
            sum_z += z.sum(dim=1) if w_c is None else torch.mv(z, w_c)
        d2 = None
        if dbuf is not None:
            d2 = softcap_slope(z, cap, out=dbuf[: z.numel()].view(z.shape)).square_()
        m_new = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - m_new)
        z.sub_(m_new.unsqueeze(1)).exp_()
        s1.mul_(rescale).add_(z.sum(dim=1))
        if full:
            if d2 is None:  # no cap: d = 1
                sww.add_((w_c * w_c).sum())
                spw.mul_(rescale).add_(torch.mv(z, w_c))
            else:
                sww.add_(d2.sum(dim=1) if w_c is None else torch.mv(d2, w_c * w_c))
                d2.mul_(z)  # d^2 e
                spw.mul_(rescale).add_(d2.sum(dim=1) if w_c is None else torch.mv(d2, w_c))
        if want_p2:
            rs2 = rescale.square()
            if d2 is None:
                s2.mul_(rs2).add_(torch.linalg.vector_norm(z, dim=1).square())
            else:  # d2 holds d^2 e now when `full`, else d^2
                s2.mul_(rs2).add_(torch.linalg.vecdot(d2, z) if full else torch.linalg.vecdot(d2 * z, z))
        m = m_new
    lse = m + torch.log(s1)
    if moments is not None and want_p2:
        if full:
            moments.update(lspw=m + torch.log(spw), s_ww=sww)
        else:
            moments.update(lspw=lse.clone(), s_ww=torch.full_like(lse, float(n_real)))
    return lse, (2 * m + torch.log(s2) if want_p2 else None), z_y, sum_z


def _local_targets(labels, ignore_index: int, vocab_start: int, n_real: int):
    """(valid [T] bool, tgt [T]): whether y_t is not ignored, and its row in this shard (-1 when it is not a
    real row of this shard)."""
    valid = labels != ignore_index
    local_idx = labels - vocab_start
    local = valid & (local_idx >= 0) & (local_idx < n_real)
    return valid, torch.where(local, local_idx, -1)


def _logit_grad_(z, c0, lse, coef, tgt, b, e, w_chunk=None, cap=None, slope_buf=None) -> torch.Tensor:
    """In place, float32 logits z [T, C] of rows c0:c0+C (already capped) -> dL/da, the one formula of
    :func:`megatron_bottleneck.base.loss_spec.logit_grad_`: (coef exp(z - lse) - b [i = tgt] - e w_i) (1 - (z/c)^2).

    coef, b, e: [T] (e may be None: no smoothing); tgt [T] local target rows (-1: not on this shard)."""
    return _spec_logit_grad_(z, c0, lse, coef, tgt, b, e, w_chunk, cap, slope_buf)


def _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w, tgt=None, b=None, e=None,
                     fp32_out=None, *, cap=None, w_local=None, bias=None, grad_bias=None):
    """grad_u [T, k] += sum_c G_c F_c and grad_w[c] += G_c^T u (both float32, "+=" semantics), with

        G_c = (coef * exp(x_c - lse) - b [i = tgt] - e w) (1 - (x_c / cap)^2)   (float32 [T, C], :func:`_logit_grad_`)

    x_c the (capped, biased) chunk logits, formed before the GEMMs; for 16-bit u it is rounded to u's dtype for
    them, and every product is accumulated in float32 across the chunks (:class:`_Gemms`: float32-output GEMMs,
    or their exact emulation by upcasting); for fp8 quantised to e5m2. tgt / b / e as in :func:`_logit_grad_`
    (None: no target / smoothing terms); w_local [n_real] the class weights (None: 1); grad_bias [n_real]
    float32 += sum_t G (with ``bias``). ``fp32_out`` as in :func:`_forward_chunks`."""
    if n_real == 0:
        return
    t = u.shape[0]
    if tgt is None:
        tgt = torch.full((t,), -1, dtype=torch.long, device=u.device)
    if b is None:
        b = torch.zeros_like(coef)
    c_max = min(chunk, n_real)
    buf = torch.empty(t * c_max, dtype=torch.float32, device=u.device)
    sbuf = torch.empty(t * c_max, dtype=torch.float32, device=u.device) if cap is not None else None
    low = _low_buffer(u, t, c_max, q)  # the 16-bit cast of G
    if fp32_out is None:
        fp32_out = fp32_output_mm(u.device.type)
    gemms = _Gemms(u, weight, c_max, fp32_out) if q is None else None

    def grad(x, c0, c):
        if bias is not None:
            x.add_(bias[c0:c0 + c].float())
        softcap_(x, cap)
        g = _logit_grad_(x, c0, lse, coef, tgt, b, e, None if w_local is None else w_local[c0:c0 + c], cap,
                         None if sbuf is None else sbuf[: x.numel()].view(x.shape))
        if grad_bias is not None:
            grad_bias[c0:c0 + c] += g.sum(dim=0)
        return g

    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        c = c1 - c0
        if q is not None:
            p = q.logits(c0, c1)  # [T, C rounded up to 16]
            grad(p[:, :c], c0, c)
            p[:, c:] = 0.0
            pad_rows = p.shape[1]
            p8, sp = fp8_ops.quantize(p, fp8_ops.E5M2)
            grad_u += fp8_ops.scaled_matmul(p8, q.w8[c0 : c0 + pad_rows], scale_a=sp, scale_b=q.sw)
            gw = fp8_ops.scaled_matmul(p8.t(), q.u8, scale_a=sp, scale_b=q.su)
            grad_w[c0:c1] += gw[:c]
            continue
        z, w_c = _chunk_logits(gemms, c0, c1, None, buf, t)
        p = grad(z, c0, c)
        gemms.add_grads(p, None if low is None else low[: t * c].view(t, c), w_c, grad_u, grad_w[c0:c1])


# ----------------------------------------------------------------------------- autograd
class _LinearCrossEntropy(torch.autograd.Function):
    """(loss_t = ce_t + zl_t, zl_t) per token; see :mod:`megatron_bottleneck.base.loss_spec` for the math."""

    @staticmethod
    def forward(ctx, u, weight, bias, labels, cfg, stats):
        tp_group = cfg["tp_group"]
        tp = group_size(tp_group)
        spec: LossSpec = cfg["spec"]
        v_local = weight.shape[0]
        vocab_start, vocab_size = cfg["vocab_start"], cfg["vocab_size"]
        n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
        s = spec.smoothing(vocab_size)
        plan = cfg["plan"]
        cap = spec.softcap
        chunk = cfg["chunk_size"] or choose_chunk_size(
            u.shape[0], max(n_real, 1), plan.memory_budget_bytes,
            0 if cfg["fp8"] else chunk_row_bytes(u.dtype, u.shape[1], plan.fp32_output_mm))
        q = _Fp8Cache(u, weight, n_real) if cfg["fp8"] else None
        if q is not None and chunk % 16:
            raise ValueError(f"fp8 needs chunk_size to be a multiple of 16, got {chunk}.")
        w_full = class_weights(spec, vocab_size, u.device)
        w_local = None if w_full is None else w_full[vocab_start:vocab_start + n_real]
        want_p2, want_sum = stats is not None, s > 0
        use_triton = (triton_lce.should_use(u, q, cfg["kernel"])
                      and not (want_p2 and (cap is not None or w_full is not None)))

        valid, tgt = _local_targets(labels, spec.ignore_index, vocab_start, n_real)
        moments = {} if want_p2 else None
        if use_triton:
            lse, lse2, z_y, sum_z = triton_lce.forward_stats(u, weight, n_real, want_p2, tgt, want_sum, softcap=cap,
                                                             bias=bias, class_weights=w_local)
            if want_p2:
                moments.update(lspw=lse.clone(), s_ww=torch.full_like(lse, float(n_real)))
        else:
            lse, lse2, z_y, sum_z = _forward_chunks(u, weight, n_real, chunk, want_p2, q, tgt, want_sum,
                                                    fp32_out=plan.fp32_output_mm, cap=cap, w_local=w_local,
                                                    bias=bias, moments=moments)

        if tp > 1:
            gmax = lse.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp_group)
            parts = [torch.exp(lse - gmax), z_y]
            if sum_z is not None:
                parts.append(sum_z)
            if lse2 is not None:
                parts += [torch.exp(lse2 - 2 * gmax), torch.exp(moments["lspw"] - gmax), moments["s_ww"]]
            buf = torch.stack(parts)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=tp_group)
            lse = gmax + torch.log(buf[0])
            z_y = buf[1]
            i = 2
            if sum_z is not None:
                sum_z, i = buf[2], 3
            if lse2 is not None:
                lse2 = 2 * gmax + torch.log(buf[i])
                moments = dict(lspw=gmax + torch.log(buf[i + 1]), s_ww=buf[i + 2])

        w_y = target_weights(w_full, labels, valid)
        total_w = float(vocab_size) if w_full is None else w_full.sum()
        ce, zl = token_loss(lse, z_y, sum_z, w_y, total_w, spec, vocab_size, valid)
        loss = ce + zl

        if stats is not None:
            zero = loss.new_zeros(())
            stats.sum_p2 = torch.where(valid, torch.exp(lse2 - 2 * lse), zero)
            stats.p_target = torch.where(valid, torch.exp(z_y - lse), zero)
            stats.lse = lse
            stats.valid = valid
            stats.label_smoothing = float(spec.label_smoothing)
            stats.z_loss_weight = float(spec.z_loss_weight)
            stats.vocab_size = vocab_size
            stats.spec = spec
            stats.d_target = softcap_slope(z_y, cap) if cap is not None else None
            stats.w_target = None if w_full is None else w_y
            stats.sum_pw = torch.where(valid, torch.exp(moments["lspw"] - lse), zero)
            stats.sum_w2 = moments["s_ww"]
            stats.total_w = total_w

        ctx.save_for_backward(u, weight, bias, lse, valid, tgt, w_y, w_local)
        ctx.cfg, ctx.n_real, ctx.chunk, ctx.tp, ctx.use_triton = cfg, n_real, chunk, tp, use_triton
        ctx.total_w = total_w
        # as Megatron's LinearWithGradAccumulationAndAsyncCommunication: main_grad is read in forward
        ctx.main_grad = getattr(weight, "main_grad", None) if cfg["weight_grad_into_main_grad"] else None
        ctx.mark_non_differentiable(lse)
        return loss, zl

    @staticmethod
    def backward(ctx, grad_loss, grad_zl):
        u, weight, bias, lse, valid, tgt, w_y, w_local = ctx.saved_tensors
        cfg, n_real, chunk = ctx.cfg, ctx.n_real, ctx.chunk
        spec = cfg["spec"]
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        h = grad_loss if grad_zl is None else grad_loss + grad_zl
        coef, b, e = grad_terms(grad_loss, h, lse, w_y, ctx.total_w, valid, spec, cfg["vocab_size"])

        q = _Fp8Cache(u, weight, n_real) if cfg["fp8"] else None
        main_grad = ctx.main_grad
        ctx.main_grad = None
        grad_u = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=u.device) if bias is not None else None
        if (main_grad is not None and main_grad.dtype == torch.float32 and main_grad.shape == weight.shape
                and main_grad.is_contiguous()):
            grad_w, direct = main_grad, True  # "+=" straight into the float32 main_grad
        else:
            grad_w, direct = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device), False
        if ctx.use_triton:
            triton_lce.backward_chunks(u, weight, n_real, lse, coef, grad_u, grad_w, tgt, b, e, chunk,
                                       softcap=spec.softcap, bias=bias, class_weights=w_local, grad_bias=grad_b)
        else:
            _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w, tgt, b, e,
                             fp32_out=cfg["plan"].fp32_output_mm, cap=spec.softcap, w_local=w_local, bias=bias,
                             grad_bias=grad_b)

        if cfg["reduce_grad_input"] and ctx.tp > 1:
            dist.all_reduce(grad_u, group=cfg["tp_group"])
        gb = None if grad_b is None else grad_b.to(bias.dtype)
        if main_grad is None:
            return grad_u.to(u.dtype), grad_w.to(weight.dtype), gb, None, None, None
        if not direct:
            main_grad.add_(grad_w)
        return grad_u.to(u.dtype), _dummy_weight_grad(weight, main_grad, u.dtype), gb, None, None, None


def _dummy_weight_grad(weight, main_grad, dtype):
    """What Megatron-Core's LinearWithGradAccumulationAndAsyncCommunication.backward returns for the weight
    once dL/dW is in main_grad: zeros (``weight.zero_out_wgrad``) or an empty tensor of main_grad's shape
    in the input dtype, with ``weight.grad_added_to_main_grad = True``; None when the weight has no
    ``grad_added_to_main_grad`` attribute."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    weight.grad_added_to_main_grad = True
    return make(main_grad.shape, dtype=dtype, device=weight.device, requires_grad=False)


# ----------------------------------------------------------------------------- public
def slice_rows(memory_bytes: int, v_local: int) -> int:
    """Tokens whose ``[S, V_local]`` float32 logit gradient fits ``memory_bytes`` (at least 1)."""
    return max(1, int(memory_bytes) // max(1, 4 * v_local))


def logit_grad_rows(u: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    grad_out: torch.Tensor, *, vocab_start: int, vocab_size: int, ignore_index: int = -100,
                    label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                    memory_budget_bytes: Optional[int] = None, loss_spec: Optional[LossSpec] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logit gradient dL/da of S tokens, recomputed from a pass's inputs and statistics: ``[S, V_local]``
    float32, 0 on padded rows (global index >= V) and ignored tokens (a = u F^T (+ bias), before the cap).

    u ``[S, k]`` and weight ``[V_local, k]`` (row 0 = global class ``vocab_start``) as given to
    :func:`linear_cross_entropy`; labels, lse (the pass's global log-sum-exp) and grad_out (dL/dloss_t): ``[S]``.
    ``loss_spec``: the pass's :class:`~megatron_bottleneck.base.loss_spec.LossSpec` (None: one from
    ignore_index, label_smoothing, z_loss_weight). The same chunk loop and dL/da as the op's backward
    (:func:`megatron_bottleneck.base.loss_spec.logit_grad_`, formed in float32 per vocab chunk), written out
    instead of multiplied: a caller bounds the output's memory by S (:func:`slice_rows`). The gradient probe
    uses it where the loss is fused (no logits exist).
    """
    spec = loss_spec if loss_spec is not None else LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                             z_loss_weight=z_loss_weight)
    s_tok, v_local = u.shape[0], weight.shape[0]
    n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
    out = torch.zeros(s_tok, v_local, dtype=torch.float32, device=u.device)
    if n_real == 0 or s_tok == 0:
        return out
    valid, tgt = _local_targets(labels, spec.ignore_index, vocab_start, n_real)
    lse = lse.float()
    w_full = class_weights(spec, vocab_size, u.device)
    w_local = None if w_full is None else w_full[vocab_start:vocab_start + n_real]
    w_y = target_weights(w_full, labels, valid)
    total_w = float(vocab_size) if w_full is None else w_full.sum()
    coef, b, e = grad_terms(grad_out, None, lse, w_y, total_w, valid, spec, vocab_size)
    plan = ChunkLoopPlan.for_device(u.device, memory_budget_bytes)
    chunk = choose_chunk_size(s_tok, n_real, plan.memory_budget_bytes,
                              chunk_row_bytes(u.dtype, u.shape[1], plan.fp32_output_mm))
    buf = torch.empty(s_tok * min(chunk, n_real), dtype=torch.float32, device=u.device)
    gemms = _Gemms(u, weight, min(chunk, n_real), plan.fp32_output_mm)
    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        x = _chunk_logits(gemms, c0, c1, None, buf, s_tok)[0]
        if bias is not None:
            x.add_(bias[c0:c1].float())
        softcap_(x, spec.softcap)
        out[:, c0:c1] = _logit_grad_(x, c0, lse, coef, tgt, b, e, None if w_local is None else w_local[c0:c1],
                                     spec.softcap)
    return out


def linear_cross_entropy(
    u: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    softcap: Optional[float] = None,
    ce_weight=None,
    reduction: str = "none",
    return_z_loss: bool = False,
    bias: Optional[torch.Tensor] = None,
    smoothing_convention: str = "megatron",
    loss_spec: Optional[LossSpec] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    stats: Optional[HeadLossStats] = None,
    fp8: Optional[str] = None,
    reduce_grad_input: bool = False,
    check_labels: bool = True,
    kernel: Optional[str] = None,
    weight_grad_into_main_grad: bool = False,
):
    """Cross-entropy of the logits u F^T (+ bias) over the vocabulary, without materialising them.

    Per token (see :mod:`megatron_bottleneck.base.loss_spec` for the math), with x = c tanh(a / c) the capped
    logits of a = u F^T + bias (x = a without ``softcap``), lse = log sum_i exp(x_i)::

        loss_t = (1 - eps) w_y (lse - x_y) + (eps / V) sum_i w_i (lse - x_i) + w_z lse^2   (0 for ignored tokens)

    i.e. torch's ``cross_entropy(x, y, weight=ce_weight, label_smoothing=eps)`` plus the z-loss; the module
    docstring has the gradients and the TP contract.

    Args:
        u: [T, k] or [s, b, k] head input (U = H B^T for a low-rank head, H for a dense head); the same
            full-sequence tensor on every TP rank. float32, bfloat16, float16 (or float64).
        weight: [V_local, k] this rank's vocab shard F (A for a low-rank head, W for a dense head), u's dtype.
        labels: [T] or [s, b] global class ids (Megatron's [b, s] labels transposed to [s, b]).
        tp_group: vocab-parallel group (None: no TP). vocab_start: global id of weight row 0 (default
            rank * V_local). vocab_size: real vocabulary V (default V_local * tp); rows at or beyond it
            are padding.
        ignore_index: label of tokens with loss 0 and no gradient.
        label_smoothing: alpha in [0, 1); ``smoothing_convention`` "megatron" (default: eps = alpha V / (V - 1),
            Megatron-Core's) or "torch" (eps = alpha, torch's / Liger's / cut-cross-entropy's).
        z_loss_weight: w_z >= 0, adds w_z lse^2 per token (Liger's ``lse_square_scale``).
        softcap: c > 0 or None: final-logit softcapping x = c tanh(a / c) (Gemma 2/3), before everything else.
        ce_weight: class weights [V] (>= 0) or None; "mean" then divides by sum_t w_{y_t} (torch / Liger).
        reduction: "none" (per-token [T] / [s, b], default), "sum", or "mean" (divided by the non-ignored
            count, or the weighted count with ce_weight; the z-loss part by the count; 0 if all ignored).
        return_z_loss: also return the z-loss part (reduced like the loss; already inside the loss: for logging).
        bias: [V_local] this rank's shard of a bias of the logits, or None (gradient returned in bias's dtype).
        loss_spec: a :class:`~megatron_bottleneck.base.loss_spec.LossSpec` giving all the loss options at once
            (then the individual ones above are not read; its logit_scale must be 1: fold MuP's
            multiplier into u).
        chunk_size: vocab rows per chunk; None picks it so that the one float32 [T, C] chunk buffer takes
            about half of ``memory_budget_bytes``.
        memory_budget_bytes: working memory of the chunk loop; None: :func:`default_memory_budget`
            (16 MiB on CPUs; on GPUs 1/8 of the free memory rounded down to a power of two, 1 to 4 GiB).
        stats: a :class:`HeadLossStats` to fill (sum p^2, p_target, lse per token).
        fp8: None or "e4m3": logit GEMMs in float8_e4m3fn, gradient GEMMs with the dL/dz chunk in
            float8_e5m2, per-tensor scales (``torch._scaled_mm``). T and k must be multiples of 16.
        reduce_grad_input: all-reduce dL/du over ``tp_group`` inside the op (default: the caller's
            TP region does it, see the module docstring).
        check_labels: raise ValueError for labels outside [0, V) other than ignore_index (and for negative
            class weights). This costs one host synchronisation (the only one of the op); the heads pass False.
        kernel: "torch" (the chunk loops), "triton" (the Triton kernels; CUDA tensors, or CPU
            tensors under TRITON_INTERPRET=1) or "auto" (Triton for CUDA float32 / bfloat16 / float16
            tensors when Triton imports, else torch); None (default): the environment variable
            MB_FUSED_KERNEL when set and not empty, else "torch" (an explicit argument wins over the
            environment). fp8, and statistics under a softcap or with ``ce_weight``, always run the torch
            loops. Both are deterministic (no atomics; fixed summation orders).
        weight_grad_into_main_grad: when True and ``weight.main_grad`` exists (Megatron DDP with
            gradient_accumulation_fusion), dL/dF (float32) is added into ``weight.main_grad`` (directly
            when main_grad is a float32 tensor of weight's shape) and the weight's gradient is a dummy, as
            in Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication``: zeros if
            ``weight.zero_out_wgrad`` else an empty tensor, with ``weight.grad_added_to_main_grad = True``;
            None if the weight has no ``grad_added_to_main_grad`` attribute. Without main_grad: ignored.

    Returns: the loss, float32: [T] or [s, b] for reduction "none", else a scalar; with ``return_z_loss`` a
    pair (loss, z_loss). ``loss.mean()`` of the per-token loss divides by every token, ignored ones included
    (reduction="mean" divides by the non-ignored ones). Gradients: dL/du in u's dtype (this rank's partial sum
    unless ``reduce_grad_input``), dL/dF in weight's dtype, both accumulated in float32 and cast once.
    """
    if loss_spec is None:
        loss_spec = LossSpec(ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                             smoothing_convention=smoothing_convention, z_loss_weight=float(z_loss_weight),
                             softcap=softcap, ce_weight=ce_weight, reduction=reduction)
    elif loss_spec.logit_scale != 1.0:
        raise ValueError(f"linear_cross_entropy takes the logits u F^T as they are: fold loss_spec.logit_scale="
                         f"{loss_spec.logit_scale} into u and pass loss_spec.with_(logit_scale=1.0).")
    spec = loss_spec
    _validate(u, weight, labels, chunk_size, fp8, bias)
    triton_lce.check_kernel(kernel)
    if memory_budget_bytes is not None and int(memory_budget_bytes) < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int or None, got {memory_budget_bytes!r}.")
    plan = ChunkLoopPlan.for_device(u.device, memory_budget_bytes)  # decided once; backward reuses it
    tp = group_size(tp_group)
    v_local = weight.shape[0]
    if vocab_start is None:
        vocab_start = group_rank(tp_group) * v_local
    if vocab_size is None:
        vocab_size = v_local * tp
    if vocab_size < 2 or vocab_size > v_local * tp:
        raise ValueError(f"vocab_size={vocab_size} must be in [2, V_local * tp = {v_local * tp}].")
    if spec.ce_weight is not None:
        class_weights(spec, vocab_size, u.device)  # one line if it has not V entries
    lead = labels.shape
    u2 = u.reshape(-1, u.shape[-1])
    y = labels.reshape(-1)
    if check_labels:  # the op's only host synchronisation, opt-out with check_labels=False
        bad = (y != spec.ignore_index) & ((y < 0) | (y >= vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels contain {int(bad.sum())} ids outside [0, {vocab_size}) other than "
                f"ignore_index={spec.ignore_index}; fix the labels or vocab_size."
            )
        if isinstance(spec.ce_weight, torch.Tensor) and bool((spec.ce_weight < 0).any()):
            raise ValueError("ce_weight holds negative class weights; class weights must be >= 0.")
    if fp8 is not None:
        fp8_ops.check_multiple_of_16("T (tokens)", u2.shape[0], "pad the micro-batch tokens (s * b) to a multiple of 16")
        fp8_ops.check_multiple_of_16("k (head input width)", u2.shape[1], "use a rank / hidden size that is a multiple of 16")
    cfg = dict(
        tp_group=tp_group,
        vocab_start=int(vocab_start),
        vocab_size=int(vocab_size),
        spec=spec,
        chunk_size=chunk_size,
        plan=plan,
        fp8=fp8,
        reduce_grad_input=reduce_grad_input,
        kernel=kernel,
        weight_grad_into_main_grad=bool(weight_grad_into_main_grad),
    )
    loss, zl = _LinearCrossEntropy.apply(u2, weight, bias, y, cfg, stats)
    if stats is not None and len(lead) != 1:
        for name in ("sum_p2", "p_target", "lse", "valid", "d_target", "w_target", "sum_pw", "sum_w2"):
            if getattr(stats, name) is not None:
                setattr(stats, name, getattr(stats, name).reshape(lead))
    if spec.reduction == "none":
        loss, zl = loss.reshape(lead), zl.reshape(lead)
    else:
        valid = y != spec.ignore_index
        w_full = class_weights(spec, int(vocab_size), u.device)
        loss, zl = reduce_token_loss(loss, zl, valid, target_weights(w_full, y, valid), spec, w_full is not None)
    return (loss, zl) if return_z_loss else loss


def _validate(u, weight, labels, chunk_size, fp8, bias=None) -> None:
    if u.dim() not in (2, 3):
        raise ValueError(f"u must be [T, k] or [s, b, k], got shape {tuple(u.shape)}.")
    if weight.dim() != 2 or weight.shape[1] != u.shape[-1]:
        raise ValueError(f"weight must be [V_local, {u.shape[-1]}] (u's last dim), got {tuple(weight.shape)}.")
    if tuple(labels.shape) != tuple(u.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(u.shape[:-1])} (u without its last dim), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class ids, got {labels.dtype}.")
    if u.dtype != weight.dtype:
        raise ValueError(f"u ({u.dtype}) and weight ({weight.dtype}) must have the same dtype; cast one.")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [V_local] = [{weight.shape[0]}] (this rank's shard), got {tuple(bias.shape)}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if fp8 not in (None, "e4m3"):
        raise ValueError(f"fp8 must be None or 'e4m3' (forward e4m3, gradients e5m2), got {fp8!r}.")
