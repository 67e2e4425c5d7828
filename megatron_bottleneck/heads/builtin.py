"""The built-in head kinds, registered on import of :mod:`megatron_bottleneck.heads`.

========== ============================================ ======================= ====================
kind       logits / log-probabilities                   loss                    parameters
========== ============================================ ======================= ====================
dense      z = W h                                      fused                   V D
low_rank   z = A B h                                    fused                   r (V + D)
mos        log sum_k pi_k softmax(W tanh(P_k h))        fused (K passes)        V D + K D^2 + K D
sigsoftmax z + log sigmoid(z), z = W h                  materialised            V D
softcap    c tanh(W h / c)                              materialised            V D
monotone   z + sum_j softplus(a_j) tanh(z - b_j)        materialised            V D + 2 J
stacked    W act(P h), P: D' x D                        fused                   V D' + D' D
mfs        mos with J vocab partitions in facet 1       materialised            V D + (J+K-1) D^2 + K D
mixtape    sum_k pi_k(h, i) W_i tanh(H_k h), gate tree  materialised            V D + K D^2 + (K-1) G D
                                                                                + (S+1)(K-1)(G+1)
decoupled  W P h, W: V x D', P: D' x D (rank <= D)      fused                   V D' + D' D
========== ============================================ ======================= ====================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megatron.core.utils import get_pg_size

from ..base.groups import default_tp_group
from ..base.head import HEADS, HeadBuildContext, HeadRegistry, register_head
from .cost import BUILTIN_COSTS
from .model_loss import DenseOutputLayer, as_lm_head
from .low_rank import LowRankOutputLayer, validate_head_shape
from .mfs import MultiFacetHead, MultiFacetOptions
from .mixtape import MixtapeHead, MixtapeOptions
from .mos import MixtureOfSoftmaxesHead, MixtureOfSoftmaxesOptions
from .pointwise import MonotoneOptions, PointwiseLogitHead, SigsoftmaxOptions, SoftcapOptions
from .stacked import StackedHead, StackedOptions

__all__ = ["DenseOptions", "LowRankOptions", "DecoupledOptions", "register_builtin_heads"]


@dataclass
class DenseOptions:
    """The ``dense`` head (Megatron's own ``ColumnParallelLinear``) has no options."""


@dataclass
class LowRankOptions:
    """Options of the ``low_rank`` head (see :class:`~megatron_bottleneck.heads.LowRankOutputLayer`)."""

    r: int
    """The rank r, 1 <= r <= D: W = A B with A (V x r) and B (r x D)."""
    init: Literal["balanced", "orthogonal", "from_dense"] = "balanced"
    """balanced, orthogonal, or from_dense (best rank-r approximation of the model's current head)."""
    init_std: Optional[float] = None
    """sigma, the per-entry std of A B; None: ``config.init_method_std``."""


@dataclass
class DecoupledOptions:
    """Options of the ``decoupled`` head: output embeddings of their own width (Chung et al. 2021, "Rethinking
    embedding coupling in pre-trained language models"), W ``[V, D']`` and a projection P ``[D', D]``; the
    logits W P h still have rank <= D (the baseline for heads that add rank, not parameters)."""

    width: Optional[int] = None
    """D' >= D, the output embeddings' width; None: 2 D."""
    proj_std: Optional[float] = None
    """Std of P's entries at init; None: 1/sqrt(D)."""


def _decoupled(ctx: HeadBuildContext, o: DecoupledOptions):
    return StackedHead(ctx, StackedOptions(width=o.width, activation="linear", proj_std=o.proj_std))


def _dense(ctx: HeadBuildContext, _options):
    if ctx.old_head is not None:
        return as_lm_head(ctx.old_head, ctx.real_vocab_size)
    return DenseOutputLayer(ctx.hidden_size, ctx.vocab_size, config=ctx.config, init_method=ctx.config.init_method,
                            bias=False, gather_output=ctx.gather_output, tp_group=ctx.tp_group,
                            real_vocab_size=ctx.real_vocab_size)


def _low_rank(ctx: HeadBuildContext, o: LowRankOptions):
    validate_head_shape(ctx.hidden_size, ctx.vocab_size, o.r, get_pg_size(default_tp_group(ctx.tp_group)))
    init_weight = ctx.old_head.weight if o.init == "from_dense" and ctx.old_head is not None else None
    return LowRankOutputLayer(ctx.hidden_size, ctx.vocab_size, o.r, config=ctx.config, init=o.init,
                              init_std=o.init_std, init_weight=init_weight, seed=ctx.seed,
                              gather_output=ctx.gather_output, tp_group=ctx.tp_group, device=ctx.device,
                              real_vocab_size=ctx.real_vocab_size)


BUILTIN = (
    # kind, builder, options, the probe's path, description
    ("dense", _dense, DenseOptions, "linear", "Megatron's dense head, z = W h"),
    ("low_rank", _low_rank, LowRankOptions, "linear", "rank-r head W = A B"),
    ("mos", MixtureOfSoftmaxesHead, MixtureOfSoftmaxesOptions, "general", "mixture of K softmaxes (Yang et al. 2018)"),
    ("sigsoftmax", lambda ctx, o: PointwiseLogitHead(ctx, "sigsoftmax", o), SigsoftmaxOptions, "general",
     "sigsoftmax, z + log sigmoid(z) (Kanai et al. 2018)"),
    ("softcap", lambda ctx, o: PointwiseLogitHead(ctx, "softcap", o), SoftcapOptions, "general",
     "tanh soft-capping, c tanh(z / c)"),
    ("monotone", lambda ctx, o: PointwiseLogitHead(ctx, "monotone", o), MonotoneOptions, "general",
     "learnable monotone map of the logits (Ganea et al. 2019)"),
    ("stacked", StackedHead, StackedOptions, "general", "z = W act(P h), P: D' x D"),
    ("mfs", MultiFacetHead, MultiFacetOptions, "general",
     "multi-facet softmax: mos whose first facet is split over J vocabulary partitions (after Chang & McCallum 2022)"),
    ("mixtape", MixtapeHead, MixtapeOptions, "general",
     "Mixtape: logit-space mixture with word-dependent sigmoid-tree gates and gate sharing (Yang et al. 2019)"),
    ("decoupled", _decoupled, DecoupledOptions, "general",
     "output embeddings of width D' decoupled from D, W P h (Chung et al. 2021; rank <= D)"),
)
"""The built-in kinds: builder, options dataclass, the gradient probe's path, and (``BUILTIN_COSTS``) the cost."""


def register_builtin_heads(registry: HeadRegistry = HEADS) -> None:
    """Register the built-in kinds into ``registry`` (idempotent)."""
    if "dense" in registry:
        return
    for kind, builder, options, probe, description in BUILTIN:
        register_head(kind, builder, options, description=description, cost=BUILTIN_COSTS[kind], probe=probe,
                      registry=registry)


register_builtin_heads()
