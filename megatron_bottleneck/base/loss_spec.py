"""The head's loss, written once: :class:`LossSpec` and the per-token loss and logit gradient it defines.

Every place that computes the cross-entropy a head trains on, or its gradient, calls the functions here: the fused
op's chunk loops (:mod:`megatron_bottleneck.ops.linear_cross_entropy`; its Triton kernels compute the same
formulas), the materialised loss of the vocab-parallel heads (:mod:`megatron_bottleneck.heads.vocab_parallel`), the
probe's logit gradient G (:mod:`megatron_bottleneck.probe.general`, and the linear probe through the fused op's
``logit_grad_rows``) and :class:`~megatron_bottleneck.base.loss.HeadLossStats`. Torch only.

Notation, per token t (tokens whose label is ``ignore_index`` have loss 0 and gradient 0): the head's logits z
(``[T, V]``, over the V real classes; a shard ``[T, V_local]`` per tensor-parallel rank), MuP's output multiplier
m (``logit_scale``), the softcap c (Gemma 2/3's final-logit softcapping; none: the identity), class weights w_i
(``ce_weight``; none: 1), W = sum_i w_i, the label y, smoothing fraction eps, z-loss weight zeta::

    a = m z,    x = c tanh(a / c)  (x = a without a cap),    lse = log sum_i exp(x_i),    p = softmax(x)
    ce_t = (1 - eps) w_y (lse - x_y) + (eps / V) sum_i w_i (lse - x_i)
    zl_t = zeta lse^2
    loss_t = ce_t + zl_t

This is torch's ``cross_entropy(x, y, weight=w, label_smoothing=eps, reduction="none")`` plus PaLM's z-loss, and
Liger-Kernel's definition of each option (z-loss and smoothing act on the capped logits, as Gemma defines them).
Smoothing ``convention``: "megatron" (the default, Megatron-Core's ``vocab_parallel_cross_entropy``):
eps = alpha V / (V - 1), i.e. the target distribution puts 1 - alpha on y and alpha / (V - 1) on every other
class; "torch": eps = alpha (1 - alpha + alpha / V on y, alpha / V elsewhere). Reductions (``reduction``): "none"
(per token), "sum", "mean" = sum_t ce_t / D + sum_t zl_t / N with N the non-ignored tokens and D = sum over them
of w_{y_t} (N without class weights), torch's and Liger's weighted mean; 0 when every token is ignored (torch
gives NaN there). Note: ``loss.mean()`` of the per-token output divides by every token, ignored ones included:
it is the "mean" reduction times N / T.

The gradient at a, for dL/dce_t = g_t and dL/dzl_t = h_t (h_t = g_t for L = sum_t loss_t)::

    dL/dx_ti = A_t p_ti - B_t [i = y_t] - E_t w_i,
        A_t = g_t ((1 - eps) w_y + eps W / V) + 2 zeta h_t lse_t,   B_t = g_t (1 - eps) w_y,   E_t = g_t eps / V
    dL/da_ti = dL/dx_ti (1 - (x_ti / c)^2)              (1 without a cap)
    dL/dz_ti = m dL/da_ti

(:func:`grad_terms`, :func:`logit_grad_`). ||dL/da_t||^2 has a closed form in four per-token sums a forward pass
collects (:func:`grad_sq_norm`): with d_i = 1 - (x_i / c)^2,
S_pp = sum_i d_i^2 p_i^2, S_pw = sum_i d_i^2 w_i p_i, S_ww = sum_i d_i^2 w_i^2::

    ||dL/da_t||^2 = A^2 S_pp - 2 A E S_pw + E^2 S_ww - 2 B d_y^2 (A p_y - E w_y) + B^2 d_y^2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple, Union

import torch

from .errors import ConfigError

__all__ = ["LossSpec", "SMOOTHING_CONVENTIONS", "REDUCTIONS", "softcap_", "softcap_slope", "token_loss",
           "grad_terms", "logit_grad_", "grad_sq_norm", "reduce_token_loss", "class_weights", "target_weights",
           "log_prob_token_loss", "log_prob_logit_grad"]

SMOOTHING_CONVENTIONS = ("megatron", "torch")
REDUCTIONS = ("none", "sum", "mean")
Tensor = torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    """The options of the cross-entropy a head trains on (see the module docstring for the math).

    ignore_index: label of tokens with loss 0 and no gradient (-100, as torch, Megatron and the peers).
    label_smoothing: alpha in [0, 1). smoothing_convention: "megatron" (eps = alpha V / (V - 1), default) or
    "torch" (eps = alpha). z_loss_weight: zeta >= 0 (PaLM's z-loss, Liger's ``lse_square_scale``).
    logit_scale: m, MuP's output multiplier applied to the head's logits (the fused op receives it folded
    into its input). softcap: c > 0 or None (Gemma's ``final_logit_softcapping``: x = c tanh(a / c)).
    ce_weight: class weights w ``[V]`` (>= 0; torch's and Liger's ``weight``) as a tensor or a sequence of
    floats, or None. reduction: "none" | "sum" | "mean".
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    smoothing_convention: str = "megatron"
    z_loss_weight: float = 0.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    ce_weight: Optional[Union[Tensor, Tuple[float, ...]]] = field(default=None, compare=False)
    reduction: str = "none"
    _weights: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """(device, dtype) -> the class weights as a tensor there, made once per spec (no copy per step)."""

    def __post_init__(self):
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.smoothing_convention not in SMOOTHING_CONVENTIONS:
            raise ConfigError(f"smoothing_convention must be 'megatron' (eps = alpha V / (V - 1)) or 'torch' "
                              f"(eps = alpha), got {self.smoothing_convention!r}.")
        if not float(self.z_loss_weight) >= 0.0:
            raise ConfigError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}.")
        if not (math.isfinite(float(self.logit_scale)) and float(self.logit_scale) != 0.0):
            raise ConfigError(f"logit_scale must be a finite non-zero number, got {self.logit_scale}.")
        if self.softcap is not None and not (math.isfinite(float(self.softcap)) and float(self.softcap) > 0):
            raise ConfigError(f"softcap must be a positive number or None (no cap), got {self.softcap}.")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be 'none', 'sum' or 'mean', got {self.reduction!r}.")
        w = self.ce_weight
        if w is not None and not isinstance(w, Tensor):
            try:
                w = tuple(float(v) for v in w)
            except TypeError:
                raise ConfigError(f"ce_weight must be a [V] tensor or a sequence of floats, got {type(w).__name__}.")
            if any(not (math.isfinite(v) and v >= 0) for v in w):
                raise ConfigError("ce_weight must hold finite non-negative class weights.")
            object.__setattr__(self, "ce_weight", w)
        elif w is not None and (w.dim() != 1 or w.dtype.is_complex or not w.dtype.is_floating_point):
            raise ConfigError(f"ce_weight must be a 1-D floating tensor [V], got {w.dtype} {tuple(w.shape)}.")

    def smoothing(self, vocab_size: int) -> float:
        """eps, the weight of the uniform term, for a vocabulary of V real classes (0 without smoothing)."""
        a = float(self.label_smoothing)
        if a <= 0:
            return 0.0
        return a * vocab_size / (vocab_size - 1) if self.smoothing_convention == "megatron" else a

    @property
    def weighted(self) -> bool:
        return self.ce_weight is not None

    @property
    def capped(self) -> bool:
        return self.softcap is not None

    def with_(self, **changes) -> "LossSpec":
        """A copy with ``changes`` (dataclasses.replace)."""
        return replace(self, **changes)


# ----------------------------------------------------------------------------------------- pieces
def class_weights(spec: LossSpec, vocab_size: int, device, dtype=torch.float32) -> Optional[Tensor]:
    """w ``[V]`` in ``dtype`` on ``device`` (None without class weights); ConfigError unless it has V entries.
    Made once per (spec, device, dtype) and kept in the spec: a model's spec copies its weights to the GPU once."""
    if spec.ce_weight is None:
        return None
    n = spec.ce_weight.shape[0] if isinstance(spec.ce_weight, Tensor) else len(spec.ce_weight)
    if n != vocab_size:
        raise ConfigError(f"ce_weight has {n} entries, the vocabulary {vocab_size} real classes: give one "
                          f"weight per class.")
    key = (str(torch.device(device)), dtype)
    if key not in spec._weights:
        w = spec.ce_weight
        w = w if isinstance(w, Tensor) else torch.tensor(w, dtype=torch.float64)
        spec._weights[key] = w.detach().to(device=device, dtype=dtype)
    return spec._weights[key]


def target_weights(w: Optional[Tensor], labels: Tensor, valid: Tensor, dtype=torch.float32) -> Tensor:
    """w_{y_t} ``[T]`` (1 without class weights), 0 on ignored tokens."""
    if w is None:
        return valid.to(dtype)
    return torch.where(valid, w.to(dtype)[torch.where(valid, labels, torch.zeros_like(labels))], 0.0)


def softcap_(x: Tensor, cap: Optional[float]) -> Tensor:
    """In place: x <- c tanh(x / c) (nothing without a cap). Returns x."""
    if cap is not None:
        x.div_(cap).tanh_().mul_(cap)
    return x


def softcap_slope(x: Tensor, cap: float, out: Optional[Tensor] = None) -> Tensor:
    """d = dx/da = 1 - (x / c)^2 from the CAPPED logits x (into ``out`` when given)."""
    out = torch.div(x, cap, out=out) if out is not None else x / cap
    return out.square_().neg_().add_(1.0)


def token_loss(lse: Tensor, x_y: Tensor, sum_wx: Optional[Tensor], w_y: Tensor, total_w: Union[float, Tensor],
               spec: LossSpec, vocab_size: int, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """(ce_t, zl_t) ``[T]`` from a pass's per-token sums: lse, x_y (the target's capped logit), sum_wx =
    sum_i w_i x_i (None without smoothing), w_y (0 on ignored tokens), total_w = W. Both 0 on ignored tokens."""
    eps = spec.smoothing(vocab_size)
    ce = (1.0 - eps) * w_y * (lse - x_y)
    if eps > 0:
        ce = ce + (eps / vocab_size) * (total_w * lse - sum_wx)
    zero = lse.new_zeros(())
    ce = torch.where(valid, ce, zero)
    zl = torch.where(valid, spec.z_loss_weight * lse * lse, zero) if spec.z_loss_weight else torch.zeros_like(ce)
    return ce, zl


def grad_terms(g: Tensor, h: Optional[Tensor], lse: Tensor, w_y: Tensor, total_w: Union[float, Tensor],
               valid: Tensor, spec: LossSpec, vocab_size: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(A, B, E) ``[T]`` of dL/dx_ti = A_t p_ti - B_t [i = y_t] - E_t w_i for dL/dce_t = g and dL/dzl_t = h
    (None: h = g), 0 on ignored tokens; E is None without smoothing. In lse's dtype."""
    g = torch.where(valid, g.to(lse.dtype), 0.0)
    eps = spec.smoothing(vocab_size)
    b = g * (1.0 - eps) * w_y
    coef = b + g * (eps * total_w / vocab_size) if eps > 0 else b.clone()
    if spec.z_loss_weight:
        hh = g if h is None else torch.where(valid, h.to(lse.dtype), 0.0)
        coef = coef + (2.0 * spec.z_loss_weight) * hh * lse
    e = g * (eps / vocab_size) if eps > 0 else None
    return coef, b, e


def _target_hits(tgt: Tensor, c0: int, c: int):
    j = tgt - c0
    return j.clamp(0, max(c - 1, 0)).unsqueeze(1), (j >= 0) & (j < c)


def logit_grad_(x: Tensor, c0: int, lse: Tensor, coef: Tensor, tgt: Tensor, b: Tensor, e: Optional[Tensor],
                w_chunk: Optional[Tensor] = None, cap: Optional[float] = None,
                slope_buf: Optional[Tensor] = None) -> Tensor:
    """In place, the CAPPED logits x ``[T, C]`` of columns c0:c0+C (local) -> dL/da =
    (coef exp(x - lse) - b [i = tgt] - e w_i) (1 - (x / c)^2). tgt ``[T]``: local target column (-1: not here);
    w_chunk ``[C]``: the chunk's class weights (None: 1); slope_buf: a ``[T, C]`` buffer for the cap's slope
    (allocated when None). No host decision (coef may be 0 or negative)."""
    d = softcap_slope(x, cap, out=slope_buf) if cap is not None else None
    x.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    col, hit = _target_hits(tgt, c0, x.shape[1])
    x.scatter_add_(1, col, torch.where(hit, -b, 0.0).to(x.dtype).unsqueeze(1))
    if e is not None:
        if w_chunk is None:
            x.sub_(e.unsqueeze(1))
        else:
            x.addr_(e, w_chunk.to(x.dtype), alpha=-1.0)
    if d is not None:
        x.mul_(d)
    return x


def grad_sq_norm(coef: Tensor, b: Tensor, e: Optional[Tensor], s_pp: Tensor, s_pw: Tensor, s_ww: Tensor,
                 p_y: Tensor, d_y: Tensor, w_y_raw: Tensor) -> Tensor:
    """||dL/da_t||^2 ``[T]`` from (A, B, E) of :func:`grad_terms` and the pass's sums (module docstring):
    S_pp, S_pw, S_ww, p_y, d_y = 1 - (x_y / c)^2 (1 without a cap) and w_y (the class weight, 1 without)."""
    d2 = d_y * d_y
    n2 = coef * coef * s_pp - 2.0 * b * d2 * coef * p_y + b * b * d2
    if e is not None:
        n2 = n2 - 2.0 * coef * e * s_pw + e * e * s_ww + 2.0 * b * e * d2 * w_y_raw
    return n2.clamp(min=0)


def reduce_token_loss(loss: Tensor, zl: Tensor, valid: Tensor, w_y: Tensor, spec: LossSpec,
                      weighted: bool) -> Tuple[Tensor, Tensor]:
    """(loss, z-loss) reduced by ``spec.reduction`` from per-token loss_t = ce_t + zl_t and zl_t: "none" as they
    are, "sum" summed, "mean" sum ce / D + sum zl / N (module docstring; 0 where nothing is counted). On the
    device, no host sync."""
    if spec.reduction == "none":
        return loss, zl
    if spec.reduction == "sum":
        return loss.sum(), zl.sum()
    n = valid.sum().to(loss.dtype)
    den = (w_y.to(loss.dtype) * valid).sum() if weighted else n

    def div(a, b):
        return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))

    z = div(zl.sum(), n)
    return div((loss - zl).sum(), den) + z, z


# --------------------------------------------------------------------- from log-probabilities (materialised)
def _sum_over(x: Tensor, reduce) -> Tensor:
    return x if reduce is None else reduce(x)


def log_prob_token_loss(logp: Tensor, labels: Tensor, spec: LossSpec, vocab_start: int, vocab_size: int,
                        reduce=None) -> Tensor:
    """Per-token ce_t ``[...]`` (differentiable) from this rank's columns of normalised log-probabilities
    logp ``[..., n_valid]`` = x - lse (global rows vocab_start + j): lse - x_i = -logp_i in :func:`token_loss`'s
    formula. ``reduce``: the differentiable sum over the vocabulary shards (``tp_reduce_sum`` over the TP
    group; None: one shard). z-loss and the cap need the logits themselves: the caller refuses them."""
    n = logp.shape[-1]
    valid = labels != spec.ignore_index
    local = valid & (labels >= vocab_start) & (labels < vocab_start + n)
    idx = torch.where(local, labels - vocab_start, torch.zeros_like(labels))
    picked = torch.where(local, logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1), logp.new_zeros(()))
    nll_y = -_sum_over(picked.float(), reduce)
    w = class_weights(spec, vocab_size, logp.device)
    w_y = target_weights(w, labels, valid)
    eps = spec.smoothing(vocab_size)
    sum_wx = None
    if eps > 0:  # sum_i w_i (lse - x_i) = -sum_i w_i logp_i
        lp = logp.float()
        local_sum = lp.sum(-1) if w is None else lp @ w[vocab_start:vocab_start + n]
        sum_wx = _sum_over(local_sum, reduce)  # "x" = logp, "lse" = 0
    zero = torch.zeros_like(nll_y)
    ce, _ = token_loss(zero, -nll_y, sum_wx, w_y, 0.0, spec.with_(z_loss_weight=0.0), vocab_size, valid)
    return ce


def log_prob_logit_grad(logp: Tensor, labels: Tensor, spec: LossSpec, vocab_start: int, vocab_size: int,
                        scale: Optional[Tensor] = None, lse: Optional[Tensor] = None) -> Tensor:
    """dL/dx ``[T, n_valid]`` float64 of :func:`log_prob_token_loss`'s loss (times dL/dloss_t = ``scale``, None: 1)
    from this rank's normalised log-probabilities logp ``[T, n_valid]``: A p - B [i = y] - E w_i with lse = 0.
    The gradient at the model's logits c x (MuP's multiplier c = ``spec.logit_scale``, logp = log softmax(c x))
    is c times this; the caller multiplies. ``lse`` ``[T]``: when logp is the log-softmax of logits a (a head whose
    loss is the cross-entropy of a), their log-sum-exp: the z-loss term 2 zeta lse_t p enters (dL/da); None: no
    z-loss (log-probabilities alone carry none). No collective, no host sync."""
    y = labels.reshape(-1)
    p = logp.detach().double().reshape(-1, logp.shape[-1])
    valid = y != spec.ignore_index
    n = p.shape[-1]
    w = class_weights(spec, vocab_size, p.device, torch.float64)
    w_y = target_weights(w, y, valid, torch.float64)
    total_w = float(vocab_size) if w is None else w.sum()
    g = torch.ones_like(w_y) if scale is None else scale.reshape(-1).to(torch.float64)
    lse0 = torch.zeros_like(w_y)
    z_spec = spec if lse is not None else spec.with_(z_loss_weight=0.0)
    coef, b, e = grad_terms(g, None, lse0 if lse is None else lse.reshape(-1).to(torch.float64), w_y, total_w, valid,
                            z_spec, vocab_size)  # lse enters the z-loss term only
    local = y - vocab_start
    tgt = torch.where(valid & (local >= 0) & (local < n), local, -1)
    out = p.clone()  # logit_grad_ takes logits and lse: logp itself with lse = 0
    return logit_grad_(out, 0, lse0, coef, tgt, b, e, None if w is None else w[vocab_start:vocab_start + n])
