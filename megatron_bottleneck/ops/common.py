"""Helpers shared by the per-token (:mod:`.linear_cross_entropy`) and reduced (:mod:`.reduced`) kernels."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _add_target_terms(grad_u, grad_w, u_f, w_real, g, local, idx, s, vocab_size) -> None:
    """Add the -(1 - s) g_t [i = y_t] and -(s / V) g_t terms of dL/dz to dL/du and dL/dF (float32 u_f,
    w_real = the n_real real rows): a row gather / index_add and a rank-one update, no chunk loop."""
    n_real = w_real.shape[0]
    safe = idx.clamp(max=n_real - 1)
    b = torch.where(local, g * (1.0 - s), g.new_zeros(()))
    grad_u -= b.unsqueeze(1) * w_real.index_select(0, safe)
    gw = grad_w[:n_real]  # updated in place: no second [V_local, k] tensor
    gw.index_add_(0, safe, (-(b.unsqueeze(1) * u_f)).to(gw.dtype))
    if s > 0:
        e = g * (s / vocab_size)
        grad_u -= e.unsqueeze(1) * w_real.sum(0).unsqueeze(0)
        gw -= (e @ u_f).to(gw.dtype).unsqueeze(0)
