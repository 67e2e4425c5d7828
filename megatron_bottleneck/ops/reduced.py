"""Scalar-loss variant of the fused head + cross-entropy: gradients computed during the forward pass.

``linear_cross_entropy(..., reduction="sum" | "mean")`` returns L = sum_t a_t loss_t with a_t = 1
("sum") or 1 / N_valid ("mean", N_valid = tokens whose label is not ignore_index), a_t = 0 for ignored
tokens. Because L is a scalar, dL/dz = a_t dloss_t/dz is known in the forward pass, so the op walks the
tokens in chunks of ``Tc`` rows, each with complete (all-class) logit rows [Tc, V_local]:

    z = u_c F^T           (GEMM 1)   -> m = max over classes (TP: all-reduce MAX)
    e = exp(z - m), S = sum e        (TP: all-reduce SUM of S)   lse = m + log S
    P = e * a_t (1 + 2 w lse) / S
    dL/du_c += P F        (GEMM 2);  dL/dF += P^T u_c  (GEMM 3)

three GEMMs over T x V x k against four for ``reduction="none"`` (which must recompute the logits in
backward because dL/dloss_t is only known there). The one-hot / smoothing terms are added as in the
per-token op. dL/du and dL/dF are kept from forward to backward and scaled in place by the incoming
scalar gradient there (memory: one [T, k] and one [V_local, k] float32 tensor, which backward allocates
anyway); one backward per forward.
Two [Tc]-sized all-reduces per token chunk under TP. FP8 is not offered on this path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .common import _add_target_terms, _group_size


def choose_token_chunk(num_tokens: int, num_rows: int, memory_budget_bytes: int) -> int:
    """Tokens per chunk so that one float32 [Tc, V_local] buffer takes about half the budget."""
    tc = int(memory_budget_bytes) // max(1, 8 * num_rows)
    tc = max(16, tc - tc % 16)
    return max(1, min(tc, num_tokens))


class _ReducedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, labels, cfg, stats):
        tp_group = cfg["tp_group"]
        tp = _group_size(tp_group)
        t, k = u.shape
        v_local = weight.shape[0]
        vocab_start, vocab_size, s, zw = cfg["vocab_start"], cfg["vocab_size"], cfg["smoothing"], cfg["z_loss_weight"]
        n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
        valid = labels != cfg["ignore_index"]
        local_idx = labels - vocab_start
        local = valid & (local_idx >= 0) & (local_idx < n_real)
        idx = torch.where(local, local_idx, torch.zeros_like(local_idx))
        n_valid = int(valid.sum())
        a = valid.float() / max(n_valid, 1) if cfg["reduction"] == "mean" else valid.float()

        u_f = u.float()
        w_real = weight[:n_real].float()
        zero = torch.zeros((), dtype=torch.float32, device=u.device)
        if n_real:
            z_y = torch.where(local, (u_f * w_real.index_select(0, idx.clamp(max=n_real - 1))).sum(1), zero)
        else:
            z_y = torch.zeros(t, dtype=torch.float32, device=u.device)
        sum_z = u_f @ w_real.sum(0) if s > 0 else None
        if tp > 1:
            parts = torch.stack([z_y] + ([sum_z] if sum_z is not None else []))
            dist.all_reduce(parts, group=tp_group)
            z_y = parts[0]
            sum_z = parts[1] if sum_z is not None else None

        want_p2 = stats is not None
        lse = torch.empty(t, dtype=torch.float32, device=u.device)
        sum_p2 = torch.empty_like(lse) if want_p2 else None
        grad_u = torch.zeros(t, k, dtype=torch.float32, device=u.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        tc = cfg["token_chunk"] or choose_token_chunk(t, max(n_real, 1), cfg["memory_budget_bytes"])
        buf = torch.empty(min(tc, t) * max(n_real, 1), dtype=torch.float32, device=u.device)
        w_c = weight[:n_real]
        for t0 in range(0, t, tc):
            t1 = min(t0 + tc, t)
            z = buf[: (t1 - t0) * n_real].view(t1 - t0, n_real)
            if n_real:
                if u.dtype == torch.float32:
                    torch.mm(u[t0:t1], w_c.t(), out=z)
                else:
                    z.copy_(torch.mm(u[t0:t1], w_c.t()))
                m = z.amax(dim=1)
            else:
                m = torch.full((t1 - t0,), float("-inf"), dtype=torch.float32, device=u.device)
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            z.sub_(m.unsqueeze(1)).exp_()
            sums = torch.stack([z.sum(dim=1)] + ([torch.linalg.vector_norm(z, dim=1).square()] if want_p2 else []))
            if tp > 1:
                dist.all_reduce(sums, group=tp_group)
            lse_c = m + torch.log(sums[0])
            lse[t0:t1] = lse_c
            if want_p2:
                sum_p2[t0:t1] = sums[1] / sums[0].square()
            if not n_real:
                continue
            coef = a[t0:t1] * (1.0 + 2.0 * zw * lse_c) if zw else a[t0:t1]
            z.mul_((coef / sums[0]).unsqueeze(1))
            if u.dtype == torch.float32:
                grad_u[t0:t1].addmm_(z, w_c)
                grad_w[:n_real].addmm_(z.t(), u[t0:t1])
            else:
                zl = z.to(u.dtype)
                grad_u[t0:t1] += torch.mm(zl, w_c).float()
                grad_w[:n_real] += torch.mm(zl.t(), u[t0:t1]).float()
        if n_real:  # the target terms carry the token weight a_t only (the z-loss factor multiplies p)
            _add_target_terms(grad_u, grad_w, u_f, w_real, a, local, idx, s, vocab_size)
        if cfg["reduce_grad_input"] and tp > 1:
            dist.all_reduce(grad_u, group=tp_group)

        loss_t = lse - (1.0 - s) * z_y
        if sum_z is not None:
            loss_t = loss_t - (s / vocab_size) * sum_z
        if zw:
            loss_t = loss_t + zw * lse * lse
        loss_t = torch.where(valid, loss_t, zero)
        if stats is not None:
            stats.sum_p2 = torch.where(valid, sum_p2, zero)
            stats.p_target = torch.where(valid, torch.exp(z_y - lse), zero)
            stats.lse, stats.valid = lse, valid
            stats.label_smoothing, stats.z_loss_weight, stats.vocab_size = cfg["label_smoothing"], zw, vocab_size
            stats.extra["token_weight"] = a
        # Kept as attributes, not saved tensors: backward scales them in place and releases them (no
        # second [V_local, k] tensor); a second backward through the same graph raises.
        ctx.grads = (grad_u, grad_w)
        ctx.dtypes = (u.dtype, weight.dtype)
        return (loss_t * a).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy(reduction=...) supports one backward per forward.")
        grad_u, grad_w = ctx.grads
        ctx.grads = None
        if not (grad_out.numel() == 1 and float(grad_out) == 1.0):
            grad_u.mul_(grad_out)
            grad_w.mul_(grad_out)
        return grad_u.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None
