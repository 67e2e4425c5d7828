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

and loss_t = 0, gradient 0, where y_t == ignore_index.

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
float32 chunk is cast to the input dtype for the two GEMMs (float32 accumulation; on CUDA the GEMM's float32
result is kept through ``out_dtype``, on a CPU torch has no such kernel and the chunk's product is rounded
to the input dtype once before it is added; the same holds for the logit GEMM, so on a CPU the 16-bit logits
are rounded as an unfused head's are, and float32 on CUDA). With fp8 the float32 chunk is quantised to e5m2
(one-hot term included). dL/du and dL/dF are accumulated in float32 buffers and cast
to the input dtype once at the end (or dL/dF is added into ``weight.main_grad``, see
``weight_grad_into_main_grad``). Nothing V_local x k besides dL/dF is allocated, and no [T, C] tensor
besides the chunk buffer (and its 16-bit cast). The op makes no host synchronisation in forward or backward
(``check_labels=True`` makes one, before the op).

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

from typing import Optional

import torch
import torch.distributed as dist

from ..base.loss import HeadLossStats
from . import fp8 as fp8_ops
from . import triton_linear_cross_entropy as triton_lce
from .common import _group_rank, _group_size

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes for one chunk's working tensors (GPUs)
CPU_MEMORY_BUDGET = 16 * 2**20  # CPUs: a smaller [T, C] chunk stays nearer the caches
_MIN_CHUNK = 16


# ----------------------------------------------------------------------------- helpers
def default_memory_budget(device: torch.device) -> int:
    """The op's default ``memory_budget_bytes``: 16 MiB on a CPU, else 64 MiB.

    Measured (bench/head_loss.py, T=4096, r=64, V=49152, fp32, one CPU core): the op is ~15% faster with
    16 MiB than with 64 MiB and needs 22 instead of 46 MiB.
    """
    return CPU_MEMORY_BUDGET if torch.device(device).type == "cpu" else DEFAULT_MEMORY_BUDGET


def choose_chunk_size(num_tokens: int, num_rows: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Vocab rows per chunk C so that 2 float32 [T, C] tensors fit ``memory_budget_bytes``.

    The op holds one such buffer (forward and backward each); the other half of the budget covers the
    bf16 / fp8 paths' casts. A multiple of 16 (FP8 GEMMs and tensor cores want it), at least 16, at
    most ``num_rows``. The [T, k] and [V_local, k] gradients come on top (they are outputs).
    """
    c = int(memory_budget_bytes) // max(1, 8 * num_tokens)
    c = max(_MIN_CHUNK, c - c % _MIN_CHUNK)
    return max(1, min(c, num_rows))


_CUDA_OUT_DTYPE = [True]  # becomes False if this torch has no CUDA mm(..., out_dtype=float32)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] as float32 (into ``out`` if given). float32 operands: torch.mm. 16-bit operands:
    a 16-bit GEMM (float32 accumulation); on CUDA its float32 result is kept (``out_dtype``), elsewhere
    (no such CPU kernel) the result is rounded to the operands' dtype once and upcast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and _CUDA_OUT_DTYPE[0]:
        try:
            if out is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, NotImplementedError, TypeError):
            _CUDA_OUT_DTYPE[0] = False
    r = torch.mm(a, b)
    return r.float() if out is None else out.copy_(r)


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


def _chunk_logits(u, weight, c0, c1, q: Optional[_Fp8Cache], buf: torch.Tensor, lbuf) -> torch.Tensor:
    """float32 logits [T, c1 - c0] of rows c0:c1, written into (a view of) the flat buffer ``buf``.

    One buffer serves every chunk: a fresh T x C allocation per chunk costs page faults comparable to
    the chunk's exp pass (CPU), or allocator traffic (GPU). ``lbuf``: a flat buffer of u's dtype for the
    16-bit GEMM's output where it cannot write float32 (CPU), else None."""
    t, c = u.shape[0], c1 - c0
    z = buf[: t * c].view(t, c)
    if q is not None:
        z.copy_(q.logits(c0, c1)[:, :c])
    elif lbuf is not None:
        z.copy_(torch.mm(u, weight[c0:c1].t(), out=lbuf[: t * c].view(t, c)))
    else:
        _mm_f32(u, weight[c0:c1].t(), out=z)
    return z


def _low_buffer(u: torch.Tensor, t: int, chunk: int, q) -> Optional[torch.Tensor]:
    """The flat 16-bit [T, C] buffer of the 16-bit paths (None for float32 and fp8)."""
    if q is not None or u.dtype not in (torch.bfloat16, torch.float16):
        return None
    return torch.empty(t * chunk, dtype=u.dtype, device=u.device)


def _target_hits(tgt: torch.Tensor, c0: int, c: int):
    """(column of y_t in chunk [c0, c0 + c) clamped into it [T, 1], whether it is there [T])."""
    j = tgt - c0
    return j.clamp(0, c - 1).unsqueeze(1), (j >= 0) & (j < c)


def _forward_chunks(u, weight, n_real, chunk, want_p2, q, tgt=None, want_sum=False):
    """Local online log-sum-exp over rows [0, n_real) of weight, and the target / sum logits.

    tgt [T] (int): the local row of y_t, or -1 where y_t is not a real row of this shard (None: all -1).
    Returns (lse [T], lse2 [T] or None, z_y [T], sum_z [T] or None), float32: lse = log sum_i exp(z_i)
    (-inf where n_real == 0), lse2 = log sum_i exp(2 z_i) if ``want_p2``, z_y = z_{t, tgt_t} (0 where
    tgt_t = -1), sum_z = sum_i z_ti if ``want_sum``; all from the same float32 chunk logits.
    Per chunk: m' = max(m, max_i z_i); S <- S e^(m - m') + sum_i e^(z_i - m'); S2 likewise with squares.
    """
    t = u.shape[0]
    m = torch.full((t,), float("-inf"), dtype=torch.float32, device=u.device)
    s1 = torch.zeros_like(m)
    s2 = torch.zeros_like(m) if want_p2 else None
    z_y = torch.zeros_like(m)
    sum_z = torch.zeros_like(m) if want_sum else None
    if n_real == 0:
        return m, (m.clone() if want_p2 else None), z_y, sum_z
    if tgt is None:
        tgt = torch.full((t,), -1, dtype=torch.long, device=u.device)
    c_max = min(chunk, n_real)
    buf = torch.empty(t * c_max, dtype=torch.float32, device=u.device)
    lbuf = _low_buffer(u, t, c_max, q) if not (u.is_cuda and _CUDA_OUT_DTYPE[0]) else None
    for c0 in range(0, n_real, chunk):
        z = _chunk_logits(u, weight, c0, min(c0 + chunk, n_real), q, buf, lbuf)
        col, hit = _target_hits(tgt, c0, z.shape[1])
        z_y += torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        if want_sum:
            sum_z += z.sum(dim=1)
        m_new = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - m_new)
        z.sub_(m_new.unsqueeze(1)).exp_()
        s1.mul_(rescale).add_(z.sum(dim=1))
        if want_p2:
            s2.mul_(rescale.square()).add_(torch.linalg.vector_norm(z, dim=1).square())
        m = m_new
    lse = m + torch.log(s1)
    return lse, (2 * m + torch.log(s2) if want_p2 else None), z_y, sum_z


def _local_targets(labels, ignore_index: int, vocab_start: int, n_real: int):
    """(valid [T] bool, tgt [T]): whether y_t is not ignored, and its row in this shard (-1 when it is not a
    real row of this shard)."""
    valid = labels != ignore_index
    local_idx = labels - vocab_start
    local = valid & (local_idx >= 0) & (local_idx < n_real)
    return valid, torch.where(local, local_idx, -1)


def _logit_grad_terms(grad_loss, valid, lse, smoothing: float, vocab_size: int, z_loss_weight: float):
    """(coef, b, e) [T] float32 of dL/dz_ti = coef_t p_ti - b_t [i = y_t] - e_t for dL/dloss_t = grad_loss:
    coef = g (1 + 2 w lse), b = (1 - s) g, e = g s / V (None without smoothing), g = 0 on ignored tokens."""
    g = torch.where(valid, grad_loss.float(), 0.0)
    coef = g * (1.0 + 2.0 * z_loss_weight * lse) if z_loss_weight else g
    b = g * (1.0 - smoothing)
    e = g * (smoothing / vocab_size) if smoothing > 0 else None
    return coef, b, e


def _logit_grad_(z, c0, lse, coef, tgt, b, e) -> torch.Tensor:
    """In place, float32 logits z [T, C] of rows c0:c0+C -> dL/dz = coef exp(z - lse) - b [i = tgt] - e.

    coef, b, e: [T] (e may be None: no smoothing); tgt [T] local target rows (-1: not on this shard).
    No sign test on coef (it may be negative or 0): one multiply pass, no host decision."""
    z.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    col, hit = _target_hits(tgt, c0, z.shape[1])
    z.scatter_add_(1, col, torch.where(hit, -b, 0.0).unsqueeze(1))
    if e is not None:
        z.sub_(e.unsqueeze(1))
    return z


def _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w, tgt=None, b=None, e=None):
    """grad_u [T, k] += sum_c G_c F_c and grad_w[c] += G_c^T u (both float32, "+=" semantics), with

        G_c = coef * exp(z_c - lse) - b [i = tgt] - e        (float32 [T, C], :func:`_logit_grad_`)

    formed before the GEMMs; for 16-bit u it is cast to u's dtype for them (float32 accumulation), for fp8
    quantised to e5m2. tgt / b / e as in :func:`_logit_grad_` (None: no target / smoothing terms)."""
    if n_real == 0:
        return
    t = u.shape[0]
    if tgt is None:
        tgt = torch.full((t,), -1, dtype=torch.long, device=u.device)
    if b is None:
        b = torch.zeros_like(coef)
    c_max = min(chunk, n_real)
    buf = torch.empty(t * c_max, dtype=torch.float32, device=u.device)
    low = _low_buffer(u, t, c_max, q)  # the 16-bit cast of G (and the CPU logits' 16-bit output)
    lbuf = low if not (u.is_cuda and _CUDA_OUT_DTYPE[0]) else None
    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        c = c1 - c0
        if q is not None:
            p = q.logits(c0, c1)  # [T, C rounded up to 16]
            _logit_grad_(p[:, :c], c0, lse, coef, tgt, b, e)
            p[:, c:] = 0.0
            pad_rows = p.shape[1]
            p8, sp = fp8_ops.quantize(p, fp8_ops.E5M2)
            grad_u += fp8_ops.scaled_matmul(p8, q.w8[c0 : c0 + pad_rows], scale_a=sp, scale_b=q.sw)
            gw = fp8_ops.scaled_matmul(p8.t(), q.u8, scale_a=sp, scale_b=q.su)
            grad_w[c0:c1] += gw[:c]
            continue
        p = _logit_grad_(_chunk_logits(u, weight, c0, c1, None, buf, lbuf), c0, lse, coef, tgt, b, e)
        w_c = weight[c0:c1]
        if low is not None:
            pl = low[: t * c].view(t, c)
            pl.copy_(p)
            grad_u += _mm_f32(pl, w_c)
            grad_w[c0:c1] += _mm_f32(pl.t(), u)
        else:
            grad_u.addmm_(p, w_c)
            grad_w[c0:c1].addmm_(p.t(), u)


# ----------------------------------------------------------------------------- autograd
class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, labels, cfg, stats):
        tp_group = cfg["tp_group"]
        tp = _group_size(tp_group)
        v_local = weight.shape[0]
        vocab_start, vocab_size = cfg["vocab_start"], cfg["vocab_size"]
        n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
        s = cfg["smoothing"]
        chunk = cfg["chunk_size"] or choose_chunk_size(u.shape[0], max(n_real, 1), cfg["memory_budget_bytes"])
        q = _Fp8Cache(u, weight, n_real) if cfg["fp8"] else None
        if q is not None and chunk % 16:
            raise ValueError(f"fp8 needs chunk_size to be a multiple of 16, got {chunk}.")
        use_triton = triton_lce.should_use(u, q, cfg["kernel"])

        valid, tgt = _local_targets(labels, cfg["ignore_index"], vocab_start, n_real)

        want_p2, want_sum = stats is not None, s > 0
        if use_triton:
            lse, lse2, z_y, sum_z = triton_lce.forward_chunks(u, weight, n_real, want_p2, tgt, want_sum)
        else:
            lse, lse2, z_y, sum_z = _forward_chunks(u, weight, n_real, chunk, want_p2, q, tgt, want_sum)

        if tp > 1:
            gmax = lse.clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp_group)
            parts = [torch.exp(lse - gmax), z_y]
            if sum_z is not None:
                parts.append(sum_z)
            if lse2 is not None:
                parts.append(torch.exp(lse2 - 2 * gmax))
            buf = torch.stack(parts)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=tp_group)
            lse = gmax + torch.log(buf[0])
            z_y = buf[1]
            i = 2
            if sum_z is not None:
                sum_z, i = buf[2], 3
            if lse2 is not None:
                lse2 = 2 * gmax + torch.log(buf[i])

        loss = lse - (1.0 - s) * z_y
        if sum_z is not None:
            loss = loss - (s / vocab_size) * sum_z
        if cfg["z_loss_weight"]:
            loss = loss + cfg["z_loss_weight"] * lse * lse
        zero = loss.new_zeros(())
        loss = torch.where(valid, loss, zero)

        if stats is not None:
            stats.sum_p2 = torch.where(valid, torch.exp(lse2 - 2 * lse), zero)
            stats.p_target = torch.where(valid, torch.exp(z_y - lse), zero)
            stats.lse = lse
            stats.valid = valid
            stats.label_smoothing = cfg["label_smoothing"]
            stats.z_loss_weight = cfg["z_loss_weight"]
            stats.vocab_size = vocab_size

        ctx.save_for_backward(u, weight, lse, valid, tgt)
        ctx.cfg, ctx.n_real, ctx.chunk, ctx.tp, ctx.use_triton = cfg, n_real, chunk, tp, use_triton
        # as Megatron's LinearWithGradAccumulationAndAsyncCommunication: main_grad is read in forward
        ctx.main_grad = getattr(weight, "main_grad", None) if cfg["weight_grad_into_main_grad"] else None
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        u, weight, lse, valid, tgt = ctx.saved_tensors
        cfg, n_real, chunk = ctx.cfg, ctx.n_real, ctx.chunk
        coef, b, e = _logit_grad_terms(grad_loss, valid, lse, cfg["smoothing"], cfg["vocab_size"],
                                       cfg["z_loss_weight"])

        q = _Fp8Cache(u, weight, n_real) if cfg["fp8"] else None
        main_grad = ctx.main_grad
        ctx.main_grad = None
        grad_u = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        if (main_grad is not None and main_grad.dtype == torch.float32 and main_grad.shape == weight.shape
                and main_grad.is_contiguous()):
            grad_w, direct = main_grad, True  # "+=" straight into the float32 main_grad
        else:
            grad_w, direct = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device), False
        if ctx.use_triton:
            triton_lce.backward_chunks(u, weight, n_real, lse, coef, grad_u, grad_w, tgt, b, e, chunk)
        else:
            _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w, tgt, b, e)

        if cfg["reduce_grad_input"] and ctx.tp > 1:
            dist.all_reduce(grad_u, group=cfg["tp_group"])
        if main_grad is None:
            return grad_u.to(u.dtype), grad_w.to(weight.dtype), None, None, None
        if not direct:
            main_grad.add_(grad_w)
        return grad_u.to(u.dtype), _dummy_weight_grad(weight, main_grad, u.dtype), None, None, None


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
                    memory_budget_bytes: Optional[int] = None) -> torch.Tensor:
    """The logit gradient dL/dz of S tokens, recomputed from a pass's inputs and statistics: ``[S, V_local]``
    float32, 0 on padded rows (global index >= V) and ignored tokens.

    u ``[S, k]`` and weight ``[V_local, k]`` (row 0 = global class ``vocab_start``) as given to
    :func:`linear_cross_entropy`; labels, lse (the pass's global log-sum-exp) and grad_out (dL/dloss_t): ``[S]``.
    The same chunk loop and dL/dz as the op's backward (``dL/dz = coef p - (1 - s) g [i = y] - g s / V``,
    formed in float32 per vocab chunk), written out instead of multiplied: a caller bounds the output's
    memory by S (:func:`slice_rows`). The gradient probe uses it where the loss is fused (no logits exist).
    """
    s_tok, v_local = u.shape[0], weight.shape[0]
    n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
    out = torch.zeros(s_tok, v_local, dtype=torch.float32, device=u.device)
    if n_real == 0 or s_tok == 0:
        return out
    valid, tgt = _local_targets(labels, ignore_index, vocab_start, n_real)
    smoothing = label_smoothing * vocab_size / (vocab_size - 1) if label_smoothing > 0 else 0.0
    lse = lse.float()
    coef, b, e = _logit_grad_terms(grad_out, valid, lse, smoothing, vocab_size, z_loss_weight)
    budget = default_memory_budget(u.device) if memory_budget_bytes is None else memory_budget_bytes
    chunk = choose_chunk_size(s_tok, n_real, budget)
    buf = torch.empty(s_tok * min(chunk, n_real), dtype=torch.float32, device=u.device)
    lbuf = _low_buffer(u, s_tok, min(chunk, n_real), None) if not (u.is_cuda and _CUDA_OUT_DTYPE[0]) else None
    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        out[:, c0:c1] = _logit_grad_(_chunk_logits(u, weight, c0, c1, None, buf, lbuf), c0, lse, coef, tgt, b, e)
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
    chunk_size: Optional[int] = None,
    memory_budget_bytes: Optional[int] = None,
    stats: Optional[HeadLossStats] = None,
    fp8: Optional[str] = None,
    reduce_grad_input: bool = False,
    check_labels: bool = True,
    kernel: str = "torch",
    weight_grad_into_main_grad: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy of logits u F^T over the vocabulary, without materialising them.

    loss_t = lse_t - (1 - s) z_{t,y} - s mean_i z_ti + w lse_t^2 (0 for ignored tokens), see the module
    docstring for the math, the gradients and the TP contract.

    Args:
        u: [T, k] or [s, b, k] head input (U = H B^T for a low-rank head, H for a dense head); the same
            full-sequence tensor on every TP rank. float32, bfloat16, float16 (or float64).
        weight: [V_local, k] this rank's vocab shard F (A for a low-rank head, W for a dense head), u's dtype.
        labels: [T] or [s, b] global class ids (Megatron's [b, s] labels transposed to [s, b]).
        tp_group: vocab-parallel group (None: no TP). vocab_start: global id of weight row 0 (default
            rank * V_local). vocab_size: real vocabulary V (default V_local * tp); rows at or beyond it
            are padding.
        ignore_index: label of tokens with loss 0 and no gradient.
        label_smoothing: alpha in [0, 1), Megatron's semantics over the V real classes.
        z_loss_weight: w >= 0, adds w lse^2 per token.
        chunk_size: vocab rows per chunk; None picks it so that the one float32 [T, C] chunk buffer takes
            about half of ``memory_budget_bytes``.
        memory_budget_bytes: working memory of the chunk loop; None: :func:`default_memory_budget`
            (16 MiB on CPUs, 64 MiB otherwise).
        stats: a :class:`HeadLossStats` to fill (sum p^2, p_target, lse per token).
        fp8: None or "e4m3": logit GEMMs in float8_e4m3fn, gradient GEMMs with the dL/dz chunk in
            float8_e5m2, per-tensor scales (``torch._scaled_mm``). T and k must be multiples of 16.
        reduce_grad_input: all-reduce dL/du over ``tp_group`` inside the op (default: the caller's
            TP region does it, see the module docstring).
        check_labels: raise ValueError for labels outside [0, V) other than ignore_index. This costs one
            host synchronisation (the only one of the op); the model heads pass False.
        kernel: "torch" (the chunk loops, default), "triton" (the Triton kernels; CUDA tensors, or CPU
            tensors under TRITON_INTERPRET=1) or "auto" (Triton for CUDA float32 / bfloat16 / float16
            tensors when Triton imports, else torch). fp8 always runs the torch loops. The environment
            variable MB_FUSED_KERNEL, when set and not empty, overrides this argument.
        weight_grad_into_main_grad: when True and ``weight.main_grad`` exists (Megatron DDP with
            gradient_accumulation_fusion), dL/dF (float32) is added into ``weight.main_grad`` (directly
            when main_grad is a float32 tensor of weight's shape) and the weight's gradient is a dummy, as
            in Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication``: zeros if
            ``weight.zero_out_wgrad`` else an empty tensor, with ``weight.grad_added_to_main_grad = True``;
            None if the weight has no ``grad_added_to_main_grad`` attribute. Without main_grad: ignored.

    Returns: loss [T] or [s, b], float32. Gradients: dL/du in u's dtype (this rank's partial sum unless
    ``reduce_grad_input``), dL/dF in weight's dtype, both accumulated in float32 and cast once.
    """
    _validate(u, weight, labels, label_smoothing, z_loss_weight, chunk_size, fp8)
    triton_lce.check_kernel(kernel)
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget(u.device)
    elif int(memory_budget_bytes) < 1:
        raise ValueError(f"memory_budget_bytes must be a positive int or None, got {memory_budget_bytes!r}.")
    tp = _group_size(tp_group)
    v_local = weight.shape[0]
    if vocab_start is None:
        vocab_start = _group_rank(tp_group) * v_local
    if vocab_size is None:
        vocab_size = v_local * tp
    if vocab_size < 2 or vocab_size > v_local * tp:
        raise ValueError(f"vocab_size={vocab_size} must be in [2, V_local * tp = {v_local * tp}].")
    lead = labels.shape
    u2 = u.reshape(-1, u.shape[-1])
    y = labels.reshape(-1)
    if check_labels:  # the op's only host synchronisation, opt-out with check_labels=False
        bad = (y != ignore_index) & ((y < 0) | (y >= vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels contain {int(bad.sum())} ids outside [0, {vocab_size}) other than "
                f"ignore_index={ignore_index}; fix the labels or vocab_size."
            )
    if fp8 is not None:
        fp8_ops.check_multiple_of_16("T (tokens)", u2.shape[0], "pad the micro-batch tokens (s * b) to a multiple of 16")
        fp8_ops.check_multiple_of_16("k (head input width)", u2.shape[1], "use a rank / hidden size that is a multiple of 16")
    cfg = dict(
        tp_group=tp_group,
        vocab_start=int(vocab_start),
        vocab_size=int(vocab_size),
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        smoothing=float(label_smoothing) * vocab_size / (vocab_size - 1) if label_smoothing > 0 else 0.0,
        z_loss_weight=float(z_loss_weight),
        chunk_size=chunk_size,
        memory_budget_bytes=memory_budget_bytes,
        fp8=fp8,
        reduce_grad_input=reduce_grad_input,
        kernel=kernel,
        weight_grad_into_main_grad=bool(weight_grad_into_main_grad),
    )
    loss = _LinearCrossEntropy.apply(u2, weight, y, cfg, stats)
    if stats is not None and len(lead) != 1:
        for name in ("sum_p2", "p_target", "lse", "valid"):
            setattr(stats, name, getattr(stats, name).reshape(lead))
    return loss.reshape(lead)


def _validate(u, weight, labels, label_smoothing, z_loss_weight, chunk_size, fp8) -> None:
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
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if z_loss_weight < 0:
        raise ValueError(f"z_loss_weight must be >= 0, got {z_loss_weight}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if fp8 not in (None, "e4m3"):
        raise ValueError(f"fp8 must be None or 'e4m3' (forward e4m3, gradients e5m2), got {fp8!r}.")
