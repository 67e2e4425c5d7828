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

__all__ = ["HeadLossStats", "LossRequest", "FusedLossRecord"]


@dataclass
class HeadLossStats:
    """Per-token softmax figures filled by :func:`megatron_bottleneck.ops.linear_cross_entropy`'s forward
    (summed over TP).

    sum_p2 [T]: sum_i p_ti^2 over the real classes. p_target [T]: p_{t, y_t}. lse [T]: log-sum-exp.
    valid [T] bool: not ignored (ignored tokens have sum_p2 = p_target = 0). Shapes follow the loss
    ([T] or [s, b]). label_smoothing, z_loss_weight and vocab_size are copied from the call.

    :meth:`logit_grad_sq_norm` gives ||dL/dz_t||^2 per token without any T x V tensor; a probe sums it
    for ||G||_F^2 (with grad_out = dL/dloss_t, e.g. loss_mask / num_tokens).
    """

    sum_p2: Optional[torch.Tensor] = None
    p_target: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    label_smoothing: float = 0.0
    z_loss_weight: float = 0.0
    vocab_size: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def smoothing(self) -> float:
        """s = alpha V / (V - 1): the weight of the uniform term in Megatron's label smoothing."""
        v = float(self.vocab_size)
        return self.label_smoothing * v / (v - 1) if self.label_smoothing > 0 else 0.0

    def logit_grad_sq_norm(self, grad_out) -> torch.Tensor:
        """Per-token ||dL/dz_t||^2 (float64, shape of the loss) for dL/dloss_t = grad_out.

        With c = 1 + 2 w lse and q = (1 - s) e_y + s / V (s = alpha V / (V - 1)):
        ||c p - q||^2 = c^2 sum p^2 - 2 c ((1 - s) p_y + s / V) + (1 - s)^2 + 2 (1 - s) s / V + s^2 / V.
        Without smoothing or z-loss this is sum_i p_i^2 - 2 p_y + 1. Absolute error ~1e-7 per token
        (float32 p), so tokens with p_y -> 1 have a relatively inaccurate (tiny) norm.
        """
        if self.sum_p2 is None:
            raise ValueError("HeadLossStats is empty: pass it as stats= to linear_cross_entropy first.")
        v = float(self.vocab_size)
        s = self.smoothing
        c = 1.0 + 2.0 * self.z_loss_weight * self.lse.double()
        q2 = (1 - s) ** 2 + 2 * (1 - s) * s / v + s * s / v
        n2 = c * c * self.sum_p2.double() - 2 * c * ((1 - s) * self.p_target.double() + s / v) + q2
        g = torch.as_tensor(grad_out, dtype=torch.float64, device=n2.device)
        return torch.where(self.valid, n2.clamp(min=0) * g * g, torch.zeros_like(n2))


@dataclass
class LossRequest:
    """What a head's next forward with labels should produce (a fused head reads it on every forward).

    logits: build the logits and let the model's own cross-entropy run (the unfused path) this forward, for a
    measurement that needs the full [s, b, V/tp] logit gradient. Costs the memory the fused loss saves.
    record: keep a :class:`FusedLossRecord` of the fused pass in ``head.last_loss`` (statistics + inputs).
    """

    logits: bool = False
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
