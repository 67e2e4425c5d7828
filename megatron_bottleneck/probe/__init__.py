"""The gradient probe: how much of the logit gradient survives the LM head (Godey & Artzi 2026,
"Lost in Backpropagation: The LM Head is a Gradient Bottleneck": destroyed ratio, rank of the logit gradient).

The math lives in :mod:`.stats` (per-step figures) and :mod:`.spectrum` (rank analysis); every
integration (Megatron forward_step, the trainer, Lightning, Megatron-LM, Bridge) drives it through
:class:`GradientProbe`.
"""
from .probe import GradientProbe, ProbeConfig, head_view
from .spectrum import GramAccumulator, rank_curve, rank_figures
from .stats import StepAccumulator, isotropic_baseline

__all__ = ["GradientProbe", "ProbeConfig", "StepAccumulator", "GramAccumulator", "rank_figures", "rank_curve",
           "isotropic_baseline", "head_view"]
