"""What a fused head + loss pass leaves for its readers (the gradient probe), and what they may ask of it.

Shapes: s sequence, b micro-batch, T = s b tokens, k the head input width (r for a low-rank head's
U = H B^T, D for a dense head's H), V_local this rank's vocabulary shard, V the real (unpadded) vocabulary.

* :class:`HeadLossStats`: per-token softmax figures of one fused pass (summed over tensor parallelism), from
  which ||dL/dz_t||^2 follows without any T x V tensor.
* :class:`LossRequest`: what the next forward of a head with labels should produce; set by a reader before the
  forward (the probe does it in a forward pre-hook), read by the head.
* :class:`FusedLossRecord`: what the head keeps of its last fused pass when asked (``LossRequest.record``): the
  loss tensor it returned, its statistics, and the (detached) inputs, so a reader can recompute the logit
  gradient of a few tokens (the probe's update and rank figures on a fused model) without the logits.

Torch only; the head contract that uses them is :class:`megatron_bottleneck.base.head.LMHead`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .loss_spec import LossSpec, grad_sq_norm, grad_terms

__all__ = ["HeadLossStats", "LossRequest", "FusedLossRecord"]


@dataclass
class HeadLossStats:
    """Per-token softmax figures filled by :func:`megatron_bottleneck.ops.linear_cross_entropy`'s forward
    (summed over TP), in the notation of :mod:`megatron_bottleneck.base.loss_spec` (x the capped logits,
    p = softmax(x), d_i = 1 - (x_i / c)^2, 1 without a cap; w the class weights, 1 without).

    sum_p2 [T]: S_pp = sum_i d_i^2 p_ti^2 over the real classes (sum_i p_ti^2 without a cap). p_target [T]: p_{t, y_t}.
    lse [T]: log-sum-exp of x. valid [T] bool: not ignored (ignored tokens have sum_p2 = p_target = 0).
    d_target [T]: d_{y_t}. w_target [T]: w_{y_t} (0 on ignored tokens). sum_pw [T]: S_pw = sum_i d_i^2 w_i p_ti,
    sum_w2 [T]: S_ww = sum_i d_i^2 w_i^2 (needed with smoothing only). total_w: W = sum_i w_i. Shapes follow the
    loss ([T] or [s, b]). spec: the call's :class:`~megatron_bottleneck.base.loss_spec.LossSpec` (its
    label_smoothing, z_loss_weight also copied here), vocab_size: V.

    :meth:`logit_grad_sq_norm` gives ||dL/da_t||^2 per token (a the op's logits, before the cap) without any
    T x V tensor; a probe sums it for ||G||_F^2 (with grad_out = dL/dloss_t, e.g. loss_mask / num_tokens).
    """

    sum_p2: Optional[torch.Tensor] = None
    p_target: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    label_smoothing: float = 0.0
    z_loss_weight: float = 0.0
    vocab_size: int = 0
    spec: Optional[LossSpec] = None
    d_target: Optional[torch.Tensor] = None
    w_target: Optional[torch.Tensor] = None
    sum_pw: Optional[torch.Tensor] = None
    sum_w2: Optional[torch.Tensor] = None
    total_w: object = None
    extra: dict = field(default_factory=dict)

    def loss_spec(self) -> LossSpec:
        """The pass's LossSpec (built from label_smoothing / z_loss_weight when none was recorded)."""
        if self.spec is not None:
            return self.spec
        return LossSpec(label_smoothing=self.label_smoothing, z_loss_weight=self.z_loss_weight)

    @property
    def smoothing(self) -> float:
        """eps, the weight of the uniform term (Megatron's convention: alpha V / (V - 1))."""
        return self.loss_spec().smoothing(int(self.vocab_size))

    def logit_grad_sq_norm(self, grad_out) -> torch.Tensor:
        """Per-token ||dL/da_t||^2 (float64, shape of the loss) for dL/dloss_t = grad_out:
        :func:`~megatron_bottleneck.base.loss_spec.grad_sq_norm` of :func:`~megatron_bottleneck.base.loss_spec.
        grad_terms`. Without smoothing, z-loss, cap or weights this is sum_i p_i^2 - 2 p_y + 1. Absolute error
        ~1e-7 per token (float32 p), so tokens with p_y -> 1 have a relatively inaccurate (tiny) norm."""
        if self.sum_p2 is None:
            raise ValueError("HeadLossStats is empty: pass it as stats= to linear_cross_entropy first.")
        spec, v = self.loss_spec(), int(self.vocab_size)
        f64 = torch.float64
        lse = self.lse.double()
        valid = self.valid
        g = torch.as_tensor(grad_out, dtype=f64, device=lse.device).expand_as(lse)
        ones = torch.ones_like(lse)
        w_y = ones if self.w_target is None else self.w_target.to(f64)
        w_y = torch.where(valid, w_y, 0.0)
        total_w = float(v) if self.total_w is None else self.total_w
        total_w = total_w.to(f64) if isinstance(total_w, torch.Tensor) else float(total_w)
        coef, b, e = grad_terms(g, None, lse, w_y, total_w, valid, spec, v)
        d_y = ones if self.d_target is None else self.d_target.to(f64)
        s_pw = ones if self.sum_pw is None else self.sum_pw.to(f64)
        s_ww = torch.full_like(lse, float(v)) if self.sum_w2 is None else self.sum_w2.to(f64)
        n2 = grad_sq_norm(coef, b, e, self.sum_p2.to(f64), s_pw, s_ww, self.p_target.to(f64), d_y, w_y)
        return torch.where(valid, n2, torch.zeros_like(n2))


@dataclass
class LossRequest:
    """What a head's next forward with labels should keep (a fused head reads it on every forward).

    record: keep a :class:`FusedLossRecord` of the fused pass in ``head.last_loss`` (statistics + inputs).
    """

    record: bool = False


@dataclass
class FusedLossRecord:
    """The last fused pass of a head, kept when ``LossRequest.record`` was set.

    loss: the per-token loss ``[s, b]`` the head returned (its autograd output: a reader hooks its gradient,
    dL/dloss_t). stats: its :class:`HeadLossStats` (lse, sum p^2, p_y, valid; shapes ``[s, b]``).
    input: the fused op's input u, detached, ``[s, b, k]`` over the full sequence on every TP rank (U = H B^T
    for a low-rank head, H for a dense one; already multiplied by ``logit_scale``). weight: this rank's vocab
    shard F, detached, ``[V_local, k]``; mix: M with W = F M (``[k, D]``), None for a dense head.
    labels: ``[s, b]`` global class ids. vocab_start: global id of F's row 0. vocab_size: real V.
    logit_scale: c, the factor the logits carry (MuP's output multiplier; 1.0 otherwise). The probe's G is the
    gradient at the head's own logits z, c dL/d(c z) (what an unfused probe hooks, and what dL/dH carries).
    bias: this rank's shard ``[V_local]`` of the head's logit bias, detached, times ``logit_scale`` (None: no bias).
    """

    loss: torch.Tensor
    stats: HeadLossStats
    input: torch.Tensor
    weight: torch.Tensor
    mix: Optional[torch.Tensor]
    labels: torch.Tensor
    vocab_start: int
    vocab_size: int
    logit_scale: float = 1.0
    bias: Optional[torch.Tensor] = None
