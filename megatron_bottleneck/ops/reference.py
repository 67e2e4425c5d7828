"""Reference head + cross-entropy that materialises the logits (for tests and benchmarks only).

Same contract and math as :func:`.linear_cross_entropy.linear_cross_entropy` on one process: logits
Z = u F^T ([T, V_rows]) are cut to the V real classes, then per token

    loss_t = (1 - s)(lse_t - z_ty) - s mean_i log p_ti + w lse_t^2,   s = alpha V / (V - 1),

0 where y_t == ignore_index. Gradients come from autograd.
"""
from __future__ import annotations

from typing import Optional

import torch


def linear_cross_entropy_reference(
    u: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    logits_out: Optional[list] = None,
) -> torch.Tensor:
    """u [T, k] or [s, b, k]; weight [V_rows, k] (the whole vocabulary); labels [T] or [s, b].

    Returns per-token loss (float32, shape of labels). ``logits_out``: if a list, the float32 real
    logits [T, V] (requiring grad when u or weight do, with ``retain_grad``) are appended to it, so a
    test can read G = dL/dZ after backward.
    """
    lead = labels.shape
    u2 = u.reshape(-1, u.shape[-1])
    y = labels.reshape(-1)
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = (u2.float() @ weight.float().t())[:, :v]
    if logits_out is not None:
        if logits.requires_grad:
            logits.retain_grad()
        logits_out.append(logits)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse.unsqueeze(-1)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    nll = -logp.gather(1, safe_y.unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        s = label_smoothing * v / (v - 1)
        loss = (1 - s) * nll - s * logp.mean(dim=-1)
    else:
        loss = nll
    if z_loss_weight:
        loss = loss + z_loss_weight * lse * lse
    loss = torch.where(valid, loss, loss.new_zeros(()))
    return loss.reshape(lead)
