"""A stacked (wider) head: z = W psi(h), psi an MLP from D into D' >= D, vocab-parallel W ``[V/tp, D']``.

psi(h) = act(P h) with P ``[D', D]`` (``proj``) replicated over TP, act one of gelu / tanh / relu / linear
(``linear``: W P, an output embedding of width D' decoupled from the hidden size, still of rank <= D: the
``decoupled`` kind). The logits
are linear in W given psi(h), so the loss is the fused head + loss of the dense head with ``loss_input`` =
psi(h) (:func:`megatron_bottleneck.ops.linear_cross_entropy`, no ``[T, V]`` logits; label smoothing and
z-loss as there). Parameters: V D' + D' D. For the probe it is non-linear in h (J_t = W diag(act'(P h_t)) P
changes per token): it gives ``log_prob_fn`` and the linear probe refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext, HeadLogProb
from ..base.tp_autograd import tp_copy, tp_log_softmax
from .contract import LinearLossMixin, tp_region_input
from .vocab_parallel import VocabParallelHead

__all__ = ["StackedOptions", "StackedHead"]

_ACT = {"gelu": F.gelu, "tanh": torch.tanh, "relu": F.relu, "linear": lambda x: x}


@dataclass
class StackedOptions:
    """Options of the ``stacked`` head."""

    width: Optional[int] = None
    """D' >= D, the width of psi(h) and of W's rows; None: 2 D."""
    activation: Literal["gelu", "tanh", "relu", "linear"] = "gelu"
    """The MLP's non-linearity; ``linear``: none (W P, rank <= D: the ``decoupled`` baseline)."""
    proj_std: Optional[float] = None
    """Std of P's entries at init; None: 1/sqrt(D)."""

    def __post_init__(self):
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise HeadConfigError(f"width must be an integer >= 1 (D' >= D), got {self.width!r}")


class StackedHead(LinearLossMixin, VocabParallelHead):
    """The ``stacked`` head (module docstring): fused loss over u = psi(h) and W's shard (:class:`LinearLossMixin`'s
    ``loss``, first in the MRO; the rest from :class:`VocabParallelHead`)."""

    def __init__(self, ctx: HeadBuildContext, options: StackedOptions, init_std: Optional[float] = None):
        width = options.width or 2 * ctx.hidden_size
        if width < ctx.hidden_size:
            raise HeadConfigError(f"stacked head width {width} is below the hidden size {ctx.hidden_size}: "
                                  f"use width >= {ctx.hidden_size} (D' >= D)")
        super().__init__(ctx, width=width, init_std=init_std)
        self.activation = options.activation
        std = options.proj_std if options.proj_std is not None else ctx.hidden_size ** -0.5
        self.add_replicated("proj", self.draw(width, ctx.hidden_size, std=std))

    def psi(self, p, h: torch.Tensor) -> torch.Tensor:
        """psi(h) = act(P h), ``[..., D']``."""
        return _ACT[self.activation](torch.matmul(h, p["proj"].t()))

    def replicated_part(self, p, h):
        return (self.psi(p, h),)

    def sharded_part(self, p, x):
        return tp_log_softmax(torch.matmul(x, self.weight_rows(p).t()), self.tp_group)

    def log_prob_fn(self) -> HeadLogProb:
        """VocabParallelHead's, with ``logits_fn`` z = W psi(h) (this rank's real columns): the general probe takes
        G = dL/dz, the z-loss included."""
        lp = super().log_prob_fn()

        def logits(p: Dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
            (x,) = [tp_copy(v, self.tp_group) for v in self.replicated_part(p, h)]
            return torch.matmul(x, self.weight_rows(p).t())

        return replace(lp, logits_fn=logits)

    # linear in W given psi(h): the fused loss of the dense head over psi(h)
    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return tp_region_input(self.psi(self._params(), hidden), self.tp_group, self.sequence_parallel)

    def loss_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        return self._params(weight)["weight"]
