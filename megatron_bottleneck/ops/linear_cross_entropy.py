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
rank walks its shard in vocab chunks of ``chunk_size`` rows (online log-sum-exp), then one MAX and one
SUM all-reduce (over [T]-sized vectors, never V-sized) combine the ranks, as Megatron's
``vocab_parallel_cross_entropy`` does. Backward recomputes each chunk's logits and accumulates

    dL/du = sum_chunks (g_z)_chunk F_chunk        [T, k]   (this rank's partial sum, see below)
    dL/dF_chunk = (g_z)_chunk^T u                 [C, k]

with g_z = grad_out * dloss/dz. The one-hot and smoothing terms are applied outside the chunk loop as a
row gather / index_add and a rank-1 update, so the loop is GEMM, exp, GEMM, GEMM.

TP contract for dL/du: by default the op returns this rank's partial sum over its vocab shard, like a
``ColumnParallelLinear`` without its input region: the caller wraps u in Megatron's
``copy_to_tensor_model_parallel_region`` (or, under sequence parallelism, gets u from
``gather_from_sequence_parallel_region``), whose backward all-reduces (reduce-scatters) it. That is what
:class:`~megatron_bottleneck.heads.low_rank.LowRankOutputLayer` already does for U. Standalone callers
pass ``reduce_grad_input=True`` and the op all-reduces dL/du itself.

Kernels: :func:`_forward_chunks` and :func:`_backward_chunks` are the only loops (u, F, lse, coef ->
lse_local; dU, dF). The Triton kernels of :mod:`.triton_linear_cross_entropy` replace them with the same
inputs and outputs (float32 / bfloat16 / float16, not fp8), never holding a [T, C] chunk in HBM. They are
opt-in: env ``MB_FUSED_KERNEL=auto`` uses them on CUDA, ``=triton`` forces them, unset or ``=torch``
keeps the torch loops (see :func:`.triton_linear_cross_entropy.should_use`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..base.loss import HeadLossStats
from . import fp8 as fp8_ops
from . import triton_linear_cross_entropy as triton_lce
from .common import _add_target_terms, _group_rank, _group_size
from .reduced import _ReducedLinearCrossEntropy

DEFAULT_MEMORY_BUDGET = 64 * 2**20  # bytes for one chunk's float32 working tensors (GPUs; scalar-loss path)
CPU_MEMORY_BUDGET = 16 * 2**20  # per-token path on CPUs: a smaller [T, C] chunk stays nearer the caches
_MIN_CHUNK = 16


# ----------------------------------------------------------------------------- helpers
def default_memory_budget(device: torch.device, reduction: str = "none") -> int:
    """The op's default ``memory_budget_bytes``: 16 MiB for the per-token path on a CPU, else 64 MiB.

    Measured (bench/head_loss.py, T=4096, r=64, V=49152, fp32, one CPU core): the per-token op is ~15%
    faster with 16 MiB than with 64 MiB and needs 22 instead of 46 MiB. The scalar-loss path chunks
    tokens with whole [Tc, V] rows, which 16 MiB would make thin (32 tokens at V=49k): it keeps 64 MiB.
    """
    if reduction == "none" and torch.device(device).type == "cpu":
        return CPU_MEMORY_BUDGET
    return DEFAULT_MEMORY_BUDGET


def choose_chunk_size(num_tokens: int, num_rows: int, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Vocab rows per chunk C so that 2 float32 [T, C] tensors fit ``memory_budget_bytes``.

    The op holds one such buffer (forward and backward each); the other half of the budget covers the
    bf16 / fp8 paths' casts. A multiple of 16 (FP8 GEMMs and tensor cores want it), at least 16, at
    most ``num_rows``. The [T, k] and [V_local, k] gradients come on top (they are outputs).
    """
    c = int(memory_budget_bytes) // max(1, 8 * num_tokens)
    c = max(_MIN_CHUNK, c - c % _MIN_CHUNK)
    return max(1, min(c, num_rows))


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

    def u(self) -> torch.Tensor:
        return fp8_ops.dequantize(self.u8, self.su)

    def w(self, n: int) -> torch.Tensor:
        return fp8_ops.dequantize(self.w8[:n], self.sw)


def _chunk_logits(u, weight, c0, c1, q: Optional[_Fp8Cache], buf: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, c1 - c0] of rows c0:c1, written into (a view of) the flat buffer ``buf``.

    One buffer serves every chunk: a fresh T x C allocation per chunk costs page faults comparable to
    the chunk's exp pass (CPU), or allocator traffic (GPU)."""
    t, c = u.shape[0], c1 - c0
    z = buf[: t * c].view(t, c)
    if q is not None:
        z.copy_(q.logits(c0, c1)[:, :c])
    elif u.dtype == torch.float32:
        torch.mm(u, weight[c0:c1].t(), out=z)
    else:
        z.copy_(torch.mm(u, weight[c0:c1].t()))
    return z


def _forward_chunks(u, weight, n_real, chunk, want_p2, q):
    """Local online log-sum-exp over rows [0, n_real) of weight.

    Returns lse [T] and, if ``want_p2``, log sum_i exp(2 z_i) [T] (float32; -inf where n_real == 0).
    Per chunk: m' = max(m, max_i z_i); S <- S e^(m - m') + sum_i e^(z_i - m'); S2 likewise with squares.
    """
    t = u.shape[0]
    m = torch.full((t,), float("-inf"), dtype=torch.float32, device=u.device)
    s1 = torch.zeros_like(m)
    s2 = torch.zeros_like(m) if want_p2 else None
    if n_real == 0:
        return m, (m.clone() if want_p2 else None)
    buf = torch.empty(t * min(chunk, n_real), dtype=torch.float32, device=u.device)
    for c0 in range(0, n_real, chunk):
        z = _chunk_logits(u, weight, c0, min(c0 + chunk, n_real), q, buf)
        m_new = torch.maximum(m, z.amax(dim=1))
        rescale = torch.exp(m - m_new)
        z.sub_(m_new.unsqueeze(1)).exp_()
        s1.mul_(rescale).add_(z.sum(dim=1))
        if want_p2:
            s2.mul_(rescale.square()).add_(torch.linalg.vector_norm(z, dim=1).square())
        m = m_new
    lse = m + torch.log(s1)
    return lse, (2 * m + torch.log(s2) if want_p2 else None)


def _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w):
    """grad_u [T, k] (float32) += sum_c P_c F_c; grad_w[c] = P_c^T u, with P_c = coef * exp(z_c - lse)."""
    if n_real == 0:
        return
    t = u.shape[0]
    positive = bool((coef >= 0).all())
    if positive:  # fold the row scale into the exponent: exp(z - lse + log coef); coef 0 gives 0
        shift = (lse - torch.log(coef)).unsqueeze(1)
    else:
        shift = lse.unsqueeze(1)
    low_precision = u.dtype != torch.float32
    buf = torch.empty(t * min(chunk, n_real), dtype=torch.float32, device=u.device)
    for c0 in range(0, n_real, chunk):
        c1 = min(c0 + chunk, n_real)
        if q is not None:
            p = q.logits(c0, c1)  # [T, C rounded up to 16]
            p.sub_(shift).exp_()
            if not positive:
                p.mul_(coef.unsqueeze(1))
            p[:, c1 - c0 :] = 0.0
            pad_rows = p.shape[1]
            p8, sp = fp8_ops.quantize(p, fp8_ops.E5M2)
            grad_u += fp8_ops.scaled_matmul(p8, q.w8[c0 : c0 + pad_rows], scale_a=sp, scale_b=q.sw)
            gw = fp8_ops.scaled_matmul(p8.t(), q.u8, scale_a=sp, scale_b=q.su)
            grad_w[c0:c1] = gw[: c1 - c0].to(grad_w.dtype)
            continue
        p = _chunk_logits(u, weight, c0, c1, None, buf)
        p.sub_(shift).exp_()
        if not positive:
            p.mul_(coef.unsqueeze(1))
        w_c = weight[c0:c1]
        if low_precision:
            pl = p.to(u.dtype)
            grad_u += torch.mm(pl, w_c).float()
            torch.mm(pl.t(), u, out=grad_w[c0:c1])
        else:
            grad_u.addmm_(p, w_c)
            torch.mm(p.t(), u, out=grad_w[c0:c1])


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

        valid = labels != cfg["ignore_index"]
        local_idx = labels - vocab_start
        local = valid & (local_idx >= 0) & (local_idx < n_real)
        idx = torch.where(local, local_idx, torch.zeros_like(local_idx))

        u_f = q.u() if q is not None else u.float()
        w_real = q.w(n_real) if q is not None else weight[:n_real].float()
        if triton_lce.should_use(u, q):
            lse, lse2 = triton_lce.forward_chunks(u, weight, n_real, stats is not None)
        else:
            lse, lse2 = _forward_chunks(u, weight, n_real, chunk, stats is not None, q)
        if n_real:
            rows = w_real.index_select(0, idx.clamp(max=n_real - 1))
            z_y = torch.where(local, (u_f * rows).sum(1), lse.new_zeros(()))
        else:
            z_y = lse.new_zeros(lse.shape)
        sum_z = u_f @ w_real.sum(0) if s > 0 else None

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

        ctx.save_for_backward(u, weight, lse, valid, local, idx)
        ctx.cfg, ctx.n_real, ctx.chunk, ctx.tp = cfg, n_real, chunk, tp
        ctx.mark_non_differentiable(lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        u, weight, lse, valid, local, idx = ctx.saved_tensors
        cfg, n_real, chunk = ctx.cfg, ctx.n_real, ctx.chunk
        s, vocab_size = cfg["smoothing"], cfg["vocab_size"]
        g = torch.where(valid, grad_loss.float(), grad_loss.new_zeros((), dtype=torch.float32))
        coef = g * (1.0 + 2.0 * cfg["z_loss_weight"] * lse) if cfg["z_loss_weight"] else g

        q = _Fp8Cache(u, weight, n_real) if cfg["fp8"] else None
        grad_u = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if q is not None else weight.dtype, device=weight.device)
        if triton_lce.should_use(u, q):
            triton_lce.backward_chunks(u, weight, n_real, lse, coef, grad_u, grad_w)
        else:
            _backward_chunks(u, weight, n_real, chunk, lse, coef, q, grad_u, grad_w)

        if n_real:
            u_f = q.u() if q is not None else u.float()
            w_real = q.w(n_real) if q is not None else weight[:n_real].float()
            _add_target_terms(grad_u, grad_w, u_f, w_real, g, local, idx, s, vocab_size)

        if cfg["reduce_grad_input"] and ctx.tp > 1:
            dist.all_reduce(grad_u, group=cfg["tp_group"])
        return grad_u.to(u.dtype), grad_w.to(weight.dtype), None, None, None


# ----------------------------------------------------------------------------- public
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
    reduction: str = "none",
    kernel: str = "torch",
    weight_grad_into_main_grad: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy of logits u F^T over the vocabulary, without materialising them.

    Args:
        u: [T, k] or [s, b, k] head input (U = H B^T for a low-rank head, H for a dense head); the same
            full-sequence tensor on every TP rank.
        weight: [V_local, k] this rank's vocab shard F (A for a low-rank head, W for a dense head).
        labels: [T] or [s, b] global class ids (Megatron's [b, s] labels transposed to [s, b]).
        tp_group: vocab-parallel group (None: no TP). vocab_start: global id of weight row 0 (default
            rank * V_local). vocab_size: real vocabulary V (default V_local * tp); rows at or beyond it
            are padding.
        ignore_index: label of tokens with loss 0 and no gradient.
        label_smoothing: alpha in [0, 1), Megatron's semantics over the V real classes.
        z_loss_weight: w >= 0, adds w lse^2 per token.
        chunk_size: vocab rows per chunk (reduction="none") or tokens per chunk (reduction "sum" /
            "mean"); None picks it so that the one float32 chunk buffer takes about half of
            ``memory_budget_bytes``.
        memory_budget_bytes: working memory of the chunk loop; None: :func:`default_memory_budget`
            (16 MiB for the per-token path on CPUs, 64 MiB otherwise).
        stats: a :class:`HeadLossStats` to fill (sum p^2, p_target, lse per token).
        fp8: None or "e4m3": logit GEMMs in float8_e4m3fn, gradient GEMMs with the softmax chunk in
            float8_e5m2, per-tensor scales (``torch._scaled_mm``). T and k must be multiples of 16.
        reduce_grad_input: all-reduce dL/du over ``tp_group`` inside the op (default: the caller's
            TP region does it, see the module docstring).
        check_labels: raise ValueError for labels outside [0, V) other than ignore_index (one host sync).
        reduction: "none" (per-token loss; backward recomputes the logits: 4 GEMMs), or "sum" / "mean"
            (mean over non-ignored tokens) for a scalar loss whose gradients are computed in the forward
            pass (3 GEMMs, see :mod:`.reduced`; no fp8).

    Returns: loss [T] or [s, b] (reduction="none") or a scalar, float32.
    """
    _validate(u, weight, labels, label_smoothing, z_loss_weight, chunk_size, fp8)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}.")
    if fp8 is not None and reduction != "none":
        raise ValueError("fp8 is only implemented for reduction='none'; drop fp8 or reduce the per-token loss yourself.")
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget(u.device, reduction)
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
    if check_labels:
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
    )
    if reduction != "none":
        cfg.update(reduction=reduction, token_chunk=chunk_size)
        loss = _ReducedLinearCrossEntropy.apply(u2, weight, y, cfg, stats)
        if stats is not None and len(lead) != 1:
            for name in ("sum_p2", "p_target", "lse", "valid"):
                setattr(stats, name, getattr(stats, name).reshape(lead))
        return loss
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
