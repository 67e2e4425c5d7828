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

Precision for a 16-bit head: its ``log_prob_fn`` gives u in float32 (the softmax maths in float32, cast before
the vocab-parallel all-reduces), G = exp(u) - q and the CG's scalars and vectors are float64, the VJP's cotangents
and the JVP's outputs float32; the JVP / VJP themselves run through the head's own 16-bit GEMMs (the Jacobian
of the 16-bit head; a float32 product would need a float32 copy of W). Measured against float64 on the same
rounded weights: ||G|| as accurate as the 16-bit logits allow, the destroyed ratio and update cosine within
~1e-3 (``tests/unit/test_head_precision.py``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.func as tfunc

from ..base.loss_spec import LossSpec, log_prob_logit_grad
from ..base.tp_autograd import tp_log_softmax, tp_reduce_sum

__all__ = ["CGResult", "centred_gram_matvec", "visible_energy_cg", "logit_grad", "head_sums", "figures_from_sums",
           "head_figures", "SUM_NAMES"]

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


def _guarded(errors: Optional[List[BaseException]], fn: Callable, fallback: Callable):
    """``fn()``, this rank's local work between two collectives. With an ``errors`` list: once any local work
    has failed (the exception appended to ``errors``), ``fallback()`` instead (zeros of the same shapes), so the
    rank goes on entering the collectives that follow, as its peers do; its result is then meaningless and the
    caller discards it. ``errors`` None: ``fn()``, exceptions propagate."""
    if errors is None:
        return fn()
    if not errors:
        try:
            return fn()
        except Exception as exc:  # kept for the caller; the collectives go on with zeros
            errors.append(exc)
    return fallback()


def visible_energy_cg(matvec: Callable[[Tensor], Tensor], dh: Tensor, iterations: int = 32,
                      rtol: Optional[float] = None,
                      token_sum: Optional[Callable[[Tensor], Tensor]] = None,
                      errors: Optional[List[BaseException]] = None) -> CGResult:
    """Batched conjugate gradients on ``M_t x_t = dh_t`` (``dh [T, D]``), from ``x_0 = 0``.

    Runs ``iterations`` iterations (D suffice in exact arithmetic: M_t is D x D), with no host sync; a token
    whose relative residual falls below :data:`CONVERGED` (or ``rtol``) stops moving; with
    ``rtol``, also stops once every token's relative residual is below it (one host sync per iteration, and
    every rank of ``token_sum``'s group must then reach the same decision: pass the same rtol only where the
    ranks hold the same tokens, else leave it None). Per token, the
    step sizes are its own (``alpha_t = r_t^T r_t / p_t^T M_t p_t``); a token whose residual reaches zero (or
    whose direction has no curvature) stops moving. token_sum: sums a scalar over the data-parallel ranks for
    ``history`` (None: this rank's tokens only). The work is float64 where the input is float32 or lower.
    errors: a list to keep a failure of this rank's local work in (see :func:`_guarded`): every iteration still
    makes its ``matvec`` and ``token_sum`` calls (their collectives), with a zero direction after the failure.
    None: an exception propagates."""
    work = torch.float64 if dh.dtype in (torch.float32, torch.float16, torch.bfloat16) else dh.dtype

    def start(b):
        rr = _dot(b, b)
        return b, torch.zeros_like(b), b.clone(), b.clone(), rr, rr.sqrt()

    # b, x, r, p, rr, bnorm (zeros after a local failure: the iterations below still make their collectives)
    b, x, r, p, rr, bnorm = _guarded(errors, lambda: start(dh.to(work)),
                                     lambda: start(torch.zeros(dh.shape, dtype=work, device=dh.device)))
    tiny = torch.finfo(work).tiny
    converged = CONVERGED if rtol is None else max(CONVERGED, rtol)
    total = token_sum or (lambda t: t)
    history: List[Tensor] = []
    done = 0

    def advance(x, r, p, rr, mp):
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
        return x, r, r + beta[:, None] * p, rr_new, _dot(b, x).sum()

    for k in range(iterations):
        if rtol is not None and bool(((rr.sqrt() <= rtol * bnorm) | (bnorm == 0)).all()):
            break
        mp = matvec(p.to(dh.dtype)).to(work)  # collectives: entered on every iteration, whatever failed
        x, r, p, rr, seen = _guarded(errors, functools.partial(advance, x, r, p, rr, mp),
                                     lambda: (x, r, torch.zeros_like(p), rr, b.new_zeros(())))
        history.append(total(seen))
        done = k + 1
    visible, residual = _guarded(errors, lambda: (_dot(b, x), torch.where(
        bnorm > 0, rr.sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)), torch.zeros_like(bnorm))),
        lambda: (torch.zeros_like(bnorm), torch.zeros_like(bnorm)))
    return CGResult(visible=visible, residual=residual, iterations=done,
                    history=torch.stack(history) if history else b.new_zeros(0))


SUM_NAMES = ("visible", "grad_sq", "residual_max", "update_inner", "update_sq", "tokens")
"""The entries of :func:`head_sums`' vector, in order (see there)."""


def logit_grad(u: Tensor, labels: Tensor, vocab_start: int, n_valid: int, vocab_size: int,
               scale: Optional[Tensor] = None, label_smoothing: float = 0.0, logit_scale: float = 1.0,
               tp_group=None, normalised: bool = False, loss_spec: Optional[LossSpec] = None,
               logits: bool = False, lse: Optional[Tensor] = None) -> Tensor:
    """This rank's columns of the logit gradient ``g_t = w_t (A_t p_t - B_t onehot(y_t) - E_t w)``, float64
    ``[T, n_valid]``, from the effective log-probabilities u ``[T, n_valid]`` (p = exp u, normalised over every
    shard) and global labels ``[T]``: the one formula of :func:`megatron_bottleneck.base.loss_spec.
    log_prob_logit_grad` for the loss options ``loss_spec`` (None: Megatron's smoothing ``label_smoothing``;
    ignore index, smoothing convention, class weights from the spec: g_t = 0 for ignored tokens), w_t =
    ``scale[t]`` (dL/dloss_t; None: 1). Without class weights or smoothing, g_t = w_t (p_t - onehot(y_t)). No host
    sync (no ``nonzero``).

    ``logit_scale`` c != 1 (MuP's output multiplier, applied by the model to the head's output u): the loss
    is the cross-entropy of c u, so p = softmax(c u) (normalised over every shard of ``tp_group``: one MAX
    and one SUM all-reduce, every rank calls it) and the gradient at u itself is c times that at c u.
    ``normalised=True``: ``u`` is already log softmax(c u) (the caller ran those collectives), no collective here.

    ``logits=True``: u is a head's logits a (``HeadLogProb.logits_fn``), not normalised: p = softmax(c a) and
    lse = logsumexp(c a) over every shard (collectives), and G = dL/da with the spec's z-loss term 2 zeta lse p.
    With ``normalised=True`` the caller passes u = log softmax(c a) and ``lse`` (``[T]``) itself."""
    spec = loss_spec if loss_spec is not None else LossSpec(label_smoothing=label_smoothing)
    if (logit_scale != 1.0 or logits) and not normalised:
        x = u.detach().double() * logit_scale
        u = tp_log_softmax(x, tp_group)
        lse = logsumexp_of(x, u) if logits else None
    g = log_prob_logit_grad(u.reshape(-1, n_valid), labels, spec, vocab_start, vocab_size, scale, lse=lse)
    return g * logit_scale if logit_scale != 1.0 else g


def logsumexp_of(x: Tensor, logp: Tensor) -> Tensor:
    """lse_t ``[T]`` of logits x ``[T, n]`` from their log-softmax logp (x - logp is lse in every column; this
    rank's first column: no collective; 0 on a rank without columns, whose G is empty)."""
    return (x - logp)[:, :1].sum(-1)


def head_sums(log_prob, hidden: Tensor, grad: Optional[Tensor] = None, labels: Optional[Tensor] = None,
              iterations: Optional[int] = None, update: bool = False, scale: Optional[Tensor] = None,
              label_smoothing: float = 0.0, logit_scale: float = 1.0,
              errors: Optional[List[BaseException]] = None, loss_spec: Optional[LossSpec] = None) -> Tensor:
    """The probe's sums for any head on one batch of T tokens: a float64 vector in the order of
    :data:`SUM_NAMES`, the same on every TP rank (already reduced over the vocabulary shards), on the device (no
    host sync). :func:`figures_from_sums` turns it (or a sum of such vectors, ``residual_max`` excepted) into the
    figures.

    hidden: ``[T, D]`` the head input, the same on every TP rank (gathered over the sequence under SP).
    The logit gradient G ``[T, n_valid]`` (this rank's real columns): from ``grad``, a cotangent c of u = log p(h)
    (e.g. the unfused head's dL/du from autograd), as g_t = c_t - p_t sum_i c_ti (sum over every shard: the
    logit gradient with the same J^T c, u being normalised; c itself for a cross-entropy of u as logits,
    w (p - q), and p - q for an NLL of u, -w q), or built from ``labels`` ``[T]`` by :func:`logit_grad`
    (``scale``: dL/dloss_t ``[T]``, ``label_smoothing`` or the whole ``loss_spec``, ``logit_scale``: MuP's
    multiplier c of the model's logits c u). Then, with dh_t = J_t^T g_t (one VJP) and visible_t from
    :func:`visible_energy_cg` after ``iterations`` iterations (default 2 D; 0: no
    CG, visible = 0):

    * ``visible`` sum_t visible_t (a lower bound on sum_t ||P_t g_t||^2 whatever the count); ``grad_sq``
      ||G||_F^2 (all shards); ``residual_max`` max_t ||dh_t - M_t x_t|| / ||dh_t||; ``tokens`` T;
    * with ``update``: ``update_inner`` <G, C dU> and ``update_sq`` ||C dU||_F^2, dU = J_h dh + J_theta
      dtheta (dtheta = J_theta^T G: the first-order change of u from an SGD step on (H, head parameters), up
      to the step's sign and size, by one JVP; C centres each token's row); 0 without.

    Every rank of the head's TP group must call it with the same T, ``iterations``, ``update`` and the same
    kind of G (``grad`` or ``labels``: the ``grad`` branch makes one more all-reduce): the JVP / VJP hold
    collectives, a fixed number of them, in an order fixed by these alone. errors: a list to keep a failure of
    this rank's own local work in (the probe's arithmetic between collectives, see :func:`_guarded`): the rank
    then goes on with zeros through every remaining collective and the sums are meaningless; None: an
    exception propagates."""
    params = {k: v.detach() for k, v in log_prob.params.items()}
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    reduce = functools.partial(tp_reduce_sum, group=log_prob.tp_group)

    logits = getattr(log_prob, "logits_fn", None) is not None  # G at the head's logits (HeadLogProb.logits_fn), z-loss included
    fn = log_prob.logits_fn if logits else log_prob.fn

    def u_of_h(hh):
        return fn(params, hh)

    with torch.enable_grad():  # also inside a backward hook (where autograd runs with grad mode off)
        u, vjp_h = tfunc.vjp(u_of_h, h)
        like = functools.partial(torch.zeros, u.shape, dtype=torch.float64, device=u.device)
        lp, lse = u, None
        scaled = logit_scale if grad is None else 1.0  # the unfused cotangent is at the head's output already
        if scaled != 1.0 or logits:  # softmax(c u): its collectives entered on every rank, zeros after a failure
            x = _guarded(errors, lambda: u.detach().double() * scaled, like)
            lp = tp_log_softmax(x, log_prob.tp_group)
            if logits:
                lse = _guarded(errors, lambda: logsumexp_of(x, lp), lambda: x.new_zeros(x.shape[0]))
        if grad is None:
            g = _guarded(errors, lambda: logit_grad(lp, labels, log_prob.vocab_start, log_prob.n_valid,
                                                    log_prob.vocab_size, scale, label_smoothing, logit_scale,
                                                    normalised=True, loss_spec=loss_spec, lse=lse), like)
        else:  # the logit gradient with the same J^T c: c - p sum_i c_i (c itself when c = w (p - q))
            c = _guarded(errors, lambda: grad.detach().reshape(-1, u.shape[-1]).double(), like)
            g = c - lp.detach().double().exp() * reduce(c.sum(-1, keepdim=True))
        g2 = reduce(g.square().sum().reshape(1)).reshape(())
        dh = vjp_h(g.to(u.dtype))[0]

        def jvp(v):
            return tfunc.jvp(u_of_h, (h,), (v,))[1]

        def vjp(w):
            return vjp_h(w)[0]

        its = 2 * h.shape[-1] if iterations is None else int(iterations)
        zero = torch.zeros((), dtype=torch.float64, device=g.device)
        if its > 0:
            res = visible_energy_cg(centred_gram_matvec(jvp, vjp, log_prob.vocab_size, reduce), dh, iterations=its,
                                    errors=errors)
            vis = res.visible.sum()
            resid = res.residual.max() if res.residual.numel() else zero
        else:
            vis, resid = zero, zero
        inner = du2 = zero
        if update:
            # dtheta = J_theta^T G (this rank's shard for sharded params; full for replicated ones).
            _, vjp_p = tfunc.vjp(lambda p: fn(p, h), params)
            dtheta = vjp_p(g.to(u.dtype))[0]
            _, du = tfunc.jvp(lambda hh, p: fn(p, hh), (h, params), (dh.to(h.dtype), dtheta))
            du = du.double()
            du = du - reduce(du.sum(-1, keepdim=True)) / log_prob.vocab_size
            inner = reduce((g * du).sum().reshape(1)).reshape(())
            du2 = reduce(du.square().sum().reshape(1)).reshape(())
    tokens = torch.full((), float(h.shape[0]), dtype=torch.float64, device=g.device)
    return torch.stack([vis.double(), g2.double(), resid.double(), inner.double(), du2.double(), tokens])


def _safe_div(a: Tensor, b: Tensor, fill: float) -> Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.full_like(a, fill))


def figures_from_sums(sums: Tensor, update: bool = False) -> Dict[str, Tensor]:
    """The figures from :func:`head_sums`' vector (0-dim float64 tensors on its device, no host sync):
    ``grad_norm`` sqrt(grad_sq), ``destroyed_ratio`` sqrt(1 - visible / grad_sq) (clamped at 0; 0 for G = 0),
    ``visible_cosine`` sqrt(visible / grad_sq), ``cg_residual`` residual_max, and with ``update``
    ``update_cosine`` update_inner / sqrt(grad_sq update_sq) (NaN where dU = 0)."""
    vis, g2, resid, inner, du2 = (sums[i] for i in range(5))
    zero = torch.zeros_like(g2)
    ratio2 = torch.where(g2 > 0, torch.clamp(1.0 - _safe_div(vis, g2, 0.0), min=0.0), zero)
    out = {"grad_norm": g2.clamp(min=0).sqrt(), "destroyed_ratio": ratio2.sqrt(),
           "visible_cosine": (1.0 - ratio2).sqrt(), "cg_residual": resid}
    if update:
        out["update_cosine"] = _safe_div(inner, (g2 * du2).sqrt(), float("nan"))
    return out


def head_figures(log_prob, hidden: Tensor, labels: Tensor, iterations: Optional[int] = None,
                 update: bool = False) -> Dict[str, Tensor]:
    """The probe's figures for any head, from its :class:`~megatron_bottleneck.base.head.HeadLogProb`, on one
    batch of tokens (summed over them; no parameter changes): :func:`figures_from_sums` of :func:`head_sums`
    with G = p - onehot(y) from ``labels``.

    hidden: ``[T, D]`` the head input, the same on every TP rank (gathered over the sequence under SP);
    labels: ``[T]`` global vocabulary ids. With u = log p(h) and g_t = p_t - onehot(y_t) (this rank's columns):

    * ``grad_norm`` ||G||_F, ``destroyed_ratio`` sqrt(1 - sum_t visible_t / ||G||^2) and ``visible_cosine``
      sqrt(sum_t visible_t / ||G||^2), visible_t from :func:`visible_energy_cg` (``iterations``, default 2 D:
      an upper bound on the destroyed ratio whatever the count), ``cg_residual`` its largest relative residual;
    * with ``update``: ``update_cosine`` cos(-G, C dU), dU the first-order change of u from one SGD step on
      (H, head parameters) (dU = -(J_h dh + J_theta dtheta), by one JVP; C centres each token's row).

    Returns 0-dim float64 tensors on the device (no host sync; every TP rank the same values). Every rank of the
    head's TP group must call it with the same T (the normalisers are collectives)."""
    return figures_from_sums(head_sums(log_prob, hidden, labels=labels, iterations=iterations, update=update),
                             update)
