"""The logit gradient of a few tokens, recomputed from a fused pass's inputs and statistics.

For tokens t of a slice (S rows), head input u_t (k), this rank's vocab shard F (V_local x k) whose row 0 is
global class ``vocab_start``, the pass's global log-sum-exp lse_t and dL/dloss_t = g_t (the per-token loss's
incoming gradient), the gradient of the loss with respect to the logits z_ti = u_t . F_i is::

    dL/dz_ti = g_t [ (1 + 2 w lse_t) p_ti - (1 - s) [i = y_t] - s / V ],   p_ti = exp(z_ti - lse_t)

(label smoothing alpha, s = alpha V / (V - 1); z-loss weight w), 0 for ignored tokens and for padded rows
(global index >= V). :func:`logit_grad_rows` returns it as ``[S, V_local]`` float32, built in vocab chunks
(no float32 copy of F beyond one chunk), so a caller bounds its memory by choosing S. This is the same math as
the backward of :func:`.linear_cross_entropy.linear_cross_entropy`; the gradient probe uses it for its update
and rank figures on a model whose loss is fused (no logits exist there). Torch only.
"""
from __future__ import annotations

import torch

__all__ = ["logit_grad_rows", "slice_rows"]

_CHUNK_ROWS = 4096


def slice_rows(memory_bytes: int, v_local: int) -> int:
    """Tokens whose ``[S, V_local]`` float32 logit gradient fits ``memory_bytes`` (at least 1)."""
    return max(1, int(memory_bytes) // max(1, 4 * v_local))


def logit_grad_rows(u: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    grad_out: torch.Tensor, *, vocab_start: int, vocab_size: int, ignore_index: int = -100,
                    label_smoothing: float = 0.0, z_loss_weight: float = 0.0) -> torch.Tensor:
    """dL/dz for the S tokens of ``u`` ``[S, k]`` against ``weight`` ``[V_local, k]``: ``[S, V_local]`` float32.

    labels, lse, grad_out: ``[S]`` (global class ids, the global log-sum-exp, dL/dloss_t). See the module
    docstring for the formula.
    """
    s_tok, v_local = u.shape[0], weight.shape[0]
    n_real = int(max(0, min(v_local, vocab_size - vocab_start)))
    out = torch.zeros(s_tok, v_local, dtype=torch.float32, device=u.device)
    if n_real == 0 or s_tok == 0:
        return out
    valid = labels != ignore_index
    g = torch.where(valid, grad_out.float(), torch.zeros((), dtype=torch.float32, device=u.device))
    lse = lse.float()
    coef = g * (1.0 + 2.0 * z_loss_weight * lse) if z_loss_weight else g
    s = label_smoothing * vocab_size / (vocab_size - 1) if label_smoothing > 0 else 0.0
    uf = u.float()
    for c0 in range(0, n_real, _CHUNK_ROWS):
        c1 = min(c0 + _CHUNK_ROWS, n_real)
        z = torch.mm(uf, weight[c0:c1].float().t())  # [S, C]: one chunk
        z.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
        if s > 0:
            z.sub_((g * (s / vocab_size)).unsqueeze(1))
        out[:, c0:c1] = z
    local = labels - vocab_start
    hit = valid & (local >= 0) & (local < n_real)
    rows = torch.arange(s_tok, device=u.device)
    idx = torch.where(hit, local, torch.zeros_like(local))
    out.index_put_((rows, idx), torch.where(hit, -(1.0 - s) * g, torch.zeros_like(g)), accumulate=True)
    return out
