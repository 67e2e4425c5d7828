"""The probe's math for any head: the visible part of the logit gradient through a per-token Jacobian,
matrix-free (``../shared/PAPER.md`` section 7).

A head sends back ``dh_t = J_t^T g_t`` with ``J_t = du_t/dh_t`` (V x D), ``u_t`` its effective logits (log p),
``g_t = p_t - onehot(y_t)``. The part of ``g_t`` the backbone sees is its projection on ``col(J_t)``; logits are
defined up to a per-token shift and ``g_t`` sums to zero, so the Jacobian is centred,
``J~_t = C J_t`` with ``C = I - 1 1^T / V``:

    visible_t = ||P_t g_t||^2 = dh_t^T M_t^+ dh_t,     M_t = J~_t^T J~_t = J_t^T J_t - V m_t m_t^T,  m_t = J_t^T 1 / V

and the batch's destroyed ratio is ``sqrt(1 - sum_t visible_t / sum_t ||g_t||^2)``. For a linear head
``J_t = W`` for every token and this is the closed form of :mod:`.stats` (centring changes at most one
dimension of col(W)).

:func:`visible_energy_cg` solves ``M_t x_t = dh_t`` for all tokens at once by conjugate gradients, each
iteration one ``M`` product (:func:`centred_gram_matvec`: a JVP and a VJP through the head, no T x V x D
Jacobian). ``dh_t`` lies in ``range(M_t)`` (``g_t = C g_t``), so the system is consistent; from ``x_0 = 0`` the
estimate ``dh_t^T x_k`` rises monotonically to ``visible_t`` (CG's iterate is the M-orthogonal projection of the
solution on a growing Krylov space), so a destroyed ratio computed after any iteration is an upper bound.
Torch only; the tensor-parallel reduction is a callable (sum over vocabulary shards).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.func as tfunc

from ..base.tp_autograd import tp_reduce_sum

__all__ = ["CGResult", "centred_gram_matvec", "visible_energy_cg", "head_figures"]

Tensor = torch.Tensor

CONVERGED = 1e-10
"""Relative residual ``||dh_t - M_t x_t|| / ||dh_t||`` at which a token's iteration stops (float64 work)."""


@dataclass
class CGResult:
    """visible: ``[T]`` the estimate ``dh_t^T x_t`` after the last iteration (a lower bound on visible_t, exact at
    convergence). residual: ``[T]`` ``||dh_t - M_t x_t|| / ||dh_t||`` (0 for a token with ``dh_t = 0``).
    iterations: iterations run. history: ``[iterations]`` ``sum_t visible_t`` after each iteration
    (non-decreasing), on the device: reading it is the caller's one host sync."""

    visible: Tensor
    residual: Tensor
    iterations: int
    history: Tensor


def centred_gram_matvec(jvp: Callable[[Tensor], Tensor], vjp: Callable[[Tensor], Tensor], vocab_size: int,
                        vocab_sum: Optional[Callable[[Tensor], Tensor]] = None,
                        centred: bool = True) -> Callable[[Tensor], Tensor]:
    """``v -> M_t v_t`` for all tokens: ``J^T C J v`` (``J^T J v`` with ``centred=False``: for a linear head that
    is the closed form's ``W^T W``, :mod:`.stats`; the centred M differs from it in at most one dimension).

    jvp: ``v [T, D] -> J v [T, V_local]`` (this rank's real vocabulary columns only, no padding); vjp:
    ``w [T, V_local] -> J^T w [T, D]`` summed over every vocabulary shard's columns (the convention of
    :class:`megatron_bottleneck.base.head.HeadLogProb`, whose VJP all-reduces inside). vocab_sum: sums the
    per-token ``[T, 1]`` column sums over the shards for the centring (an all-reduce over the tensor-parallel
    group; None: one shard). vocab_size: the real V."""
    reduce = vocab_sum or (lambda t: t)

    def matvec(v: Tensor) -> Tensor:
        jv = jvp(v)
        if centred:
            jv = jv - reduce(jv.sum(-1, keepdim=True)) / vocab_size
        return vjp(jv)

    return matvec


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def visible_energy_cg(matvec: Callable[[Tensor], Tensor], dh: Tensor, iterations: int = 32,
                      rtol: Optional[float] = None,
                      token_sum: Optional[Callable[[Tensor], Tensor]] = None) -> CGResult:
    """Batched conjugate gradients on ``M_t x_t = dh_t`` (``dh [T, D]``), from ``x_0 = 0``.

    Runs ``iterations`` iterations (D suffice in exact arithmetic: M_t is D x D), with no host sync; a token
    whose relative residual falls below :data:`CONVERGED` (or ``rtol``) stops moving; with
    ``rtol``, also stops once every token's relative residual is below it (one host sync per iteration, and
    every rank of ``token_sum``'s group must then reach the same decision: pass the same rtol only where the
    ranks hold the same tokens, else leave it None). Per token, the
    step sizes are its own (``alpha_t = r_t^T r_t / p_t^T M_t p_t``); a token whose residual reaches zero (or
    whose direction has no curvature) stops moving. token_sum: sums a scalar over the data-parallel ranks for
    ``history`` (None: this rank's tokens only). The work is float64 where the input is float32 or lower."""
    work = torch.float64 if dh.dtype in (torch.float32, torch.float16, torch.bfloat16) else dh.dtype
    b = dh.to(work)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = _dot(r, r)
    bnorm = rr.sqrt()
    tiny = torch.finfo(work).tiny
    converged = CONVERGED if rtol is None else max(CONVERGED, rtol)
    total = token_sum or (lambda t: t)
    history: List[Tensor] = []
    done = 0
    for k in range(iterations):
        if rtol is not None and bool(((rr.sqrt() <= rtol * bnorm) | (bnorm == 0)).all()):
            break
        mp = matvec(p.to(dh.dtype)).to(work)
        curv = _dot(p, mp)
        # A token stops once converged (its residual at rounding level: M_t may be singular, and past that CG
        # would follow rounding into M_t's null space) or where its direction has no curvature.
        active = (rr > (converged * bnorm) ** 2) & (curv > tiny * torch.clamp(_dot(p, p), min=1.0))
        alpha = torch.where(active, rr / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * mp
        rr_new = _dot(r, r)
        beta = torch.where(active & (rr > 0), rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)),
                           torch.zeros_like(rr))
        p = r + beta[:, None] * p
        rr = rr_new
        history.append(total(_dot(b, x).sum()))
        done = k + 1
    residual = torch.where(bnorm > 0, rr.sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)),
                           torch.zeros_like(bnorm))
    return CGResult(visible=_dot(b, x), residual=residual, iterations=done,
                    history=torch.stack(history) if history else b.new_zeros(0))


def head_figures(log_prob, hidden: Tensor, labels: Tensor, iterations: Optional[int] = None,
                 update: bool = False) -> Dict[str, Tensor]:
    """The probe's figures for any head, from its :class:`~megatron_bottleneck.base.head.HeadLogProb`, on one
    batch of tokens (summed over them; no parameter changes).

    hidden: ``[T, D]`` the head input, the same on every TP rank (gathered over the sequence under SP);
    labels: ``[T]`` global vocabulary ids. With u = log p(h) and g_t = p_t - onehot(y_t) (this rank's columns):

    * ``grad_norm`` ||G||_F, ``destroyed_ratio`` sqrt(1 - sum_t visible_t / ||G||^2) and ``visible_cosine``
      sqrt(sum_t visible_t / ||G||^2), visible_t from :func:`visible_energy_cg` (``iterations``, default 2 D:
      an upper bound on the destroyed ratio whatever the count), ``cg_residual`` its largest relative residual;
    * with ``update``: ``update_cosine`` cos(-G, C dU), dU the first-order change of u from one SGD step on
      (H, head parameters) (dU = -(J_h dh + J_theta dtheta), by one JVP; C centres each token's row).

    Returns 0-dim float64 tensors on the device (no host sync; every TP rank the same values). Every rank of the
    head's TP group must call it with the same T (the normalisers are collectives)."""
    params = {k: v.detach() for k, v in log_prob.params.items()}
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    reduce = functools.partial(tp_reduce_sum, group=log_prob.tp_group)

    def u_of_h(hh):
        return log_prob.fn(params, hh)

    u, vjp_h = tfunc.vjp(u_of_h, h)
    g = u.detach().double().exp()
    local = y - log_prob.vocab_start
    mine = (local >= 0) & (local < log_prob.n_valid)
    rows = torch.nonzero(mine).squeeze(-1)
    g[rows, local[rows]] -= 1.0
    g2 = reduce(g.square().sum().reshape(1)).reshape(())
    dh = vjp_h(g.to(u.dtype))[0]

    def jvp(v):
        return tfunc.jvp(u_of_h, (h,), (v,))[1]

    def vjp(w):
        return vjp_h(w)[0]

    matvec = centred_gram_matvec(jvp, vjp, log_prob.vocab_size, reduce)
    res = visible_energy_cg(matvec, dh, iterations=iterations or 2 * h.shape[-1])
    vis = res.visible.sum()
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    ratio2 = torch.where(g2 > 0, torch.clamp(1.0 - vis / torch.where(g2 > 0, g2, torch.ones_like(g2)), min=0.0),
                         zero)
    out = {"grad_norm": g2.sqrt(), "destroyed_ratio": ratio2.sqrt(), "visible_cosine": (1.0 - ratio2).sqrt(),
           "cg_residual": res.residual.max() if res.residual.numel() else zero}
    if update:
        # dtheta = J_theta^T G (this rank's shard for sharded params; full for replicated ones).
        _, vjp_p = tfunc.vjp(lambda p: log_prob.fn(p, h), params)
        dtheta = vjp_p(g.to(u.dtype))[0]
        _, du = tfunc.jvp(lambda hh, p: log_prob.fn(p, hh), (h, params), (dh.to(h.dtype), dtheta))
        du = du.double()
        du = du - reduce(du.sum(-1, keepdim=True)) / log_prob.vocab_size
        inner = reduce((g * du).sum().reshape(1)).reshape(())
        du2 = reduce(du.square().sum().reshape(1)).reshape(())
        denom = (g2 * du2).sqrt()
        out["update_cosine"] = torch.where(denom > 0, inner / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                           torch.full_like(denom, float("nan")))
    return out
