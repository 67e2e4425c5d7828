"""Pointwise logit non-linearities, vocab-parallel: logits f(z) with z = W h, p = softmax(f(z)).

Three maps f, applied entry-wise to z ``[..., V/tp]`` (W vocab-sharded ``[V/tp, D]``)::

    sigsoftmax (Kanai et al. 2018):   f(z) = z + log sigmoid(z)      (p_i ~ exp(z_i) sigmoid(z_i))
    softcap (tanh soft-capping):      f(z) = c tanh(z / c)           (|f| < c; option ``cap`` = c)
    monotone (Ganea et al. 2019):     f(z) = z + sum_j softplus(a_j) tanh(z - b_j)
                                      (learnable, strictly increasing: f' >= 1; ``terms`` = J pairs a, b)

u = log softmax(f(z)) over the whole vocabulary (max and sum-exp all-reduced over TP). For 16-bit
parameters z comes out of the 16-bit GEMM and is cast to float32 before f (:func:`~megatron_bottleneck.base.
tp_autograd.softmax_dtype`): f, the softmax and u are float32, as Megatron's cross-entropy of 16-bit logits
(one float32 copy of the logit shard; f's own autograd intermediates, in float32). The fused op
(:func:`megatron_bottleneck.ops.linear_cross_entropy`) computes the online log-sum-exp of z itself and takes
no pointwise transform, so these heads MATERIALISE this rank's ``[T, V/tp]`` logits (forward and loss); a
chunked online log-sum-exp over f(z) is possible and would need f inside the op's chunk loop (not done).
Parameters: V D (+ 2 J for ``monotone``). f is non-linear in W, so the linear probe refuses these heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext
from ..base.tp_autograd import softmax_dtype, tp_log_softmax
from .vocab_parallel import VocabParallelHead

__all__ = ["SigsoftmaxOptions", "SoftcapOptions", "MonotoneOptions", "PointwiseLogitHead", "TRANSFORMS"]

TRANSFORMS = ("sigsoftmax", "softcap", "monotone")


@dataclass
class SigsoftmaxOptions:
    """The ``sigsoftmax`` head has no options."""


@dataclass
class SoftcapOptions:
    """Options of the ``softcap`` head."""

    cap: float = 30.0
    """c > 0: logits c tanh(z / c)."""

    def __post_init__(self):
        if not self.cap > 0:
            raise HeadConfigError(f"cap must be > 0, got {self.cap}")


@dataclass
class MonotoneOptions:
    """Options of the ``monotone`` head."""

    terms: int = 4
    """J >= 1 terms softplus(a_j) tanh(z - b_j); init a_j = -3 (weight 0.05), b_j evenly in [-2, 2]."""

    def __post_init__(self):
        if not isinstance(self.terms, int) or self.terms < 1:
            raise HeadConfigError(f"terms must be an integer >= 1, got {self.terms!r}")


class PointwiseLogitHead(VocabParallelHead):
    """logits f(W h) for f in :data:`TRANSFORMS` (module docstring); materialised loss."""

    sharded_part_params = ("mono_scale", "mono_shift")

    def __init__(self, ctx: HeadBuildContext, transform: Literal["sigsoftmax", "softcap", "monotone"],
                 options=None, init_std: Optional[float] = None):
        if transform not in TRANSFORMS:
            raise HeadConfigError(f"transform {transform!r} is not one of {', '.join(TRANSFORMS)}")
        super().__init__(ctx, width=ctx.hidden_size, init_std=init_std)
        self.transform = transform
        self.cap = float(getattr(options, "cap", 30.0))
        if transform == "monotone":
            j = int(getattr(options, "terms", 4))
            self.add_replicated("mono_scale", torch.full((j,), -3.0))
            self.add_replicated("mono_shift", torch.linspace(-2.0, 2.0, j) if j > 1 else torch.zeros(1))

    def f(self, p, z: torch.Tensor) -> torch.Tensor:
        """The pointwise map of the logits z (in z's dtype; its parameters cast to it)."""
        if self.transform == "sigsoftmax":
            return z + F.logsigmoid(z)
        if self.transform == "softcap":
            return self.cap * torch.tanh(z / self.cap)
        scale, shift = F.softplus(p["mono_scale"].to(z.dtype)), p["mono_shift"].to(z.dtype)
        return z + (scale * torch.tanh(z.unsqueeze(-1) - shift)).sum(dim=-1)

    def sharded_part(self, p, h):
        z = torch.matmul(h, self.weight_rows(p).t())  # [..., n_valid], the GEMM in the parameters' dtype
        return tp_log_softmax(self.f(p, z.to(softmax_dtype(z.dtype))), self.tp_group)

    def extra_repr(self) -> str:
        return f"transform={self.transform}, " + super().extra_repr()
