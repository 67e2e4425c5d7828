"""The gradient probe: how much of the logit gradient survives the LM head (PAPER.md sections 1-3).

The math lives in :mod:`.stats` (per-step figures) and :mod:`.spectrum` (rank analysis); every
integration (Megatron forward_step, the trainer, Lightning) drives it through :class:`GradientProbe`.
"""
from .integrations import wrap_forward_step
from .probe import GradientProbe, ProbeConfig, head_view
from .sinks import MetricsLogger, read_jsonl
from .spectrum import GramAccumulator, rank_curve, rank_figures
from .stats import HeadView, StepAccumulator, isotropic_baseline

__all__ = [
    "GradientProbe",
    "ProbeConfig",
    "HeadView",
    "StepAccumulator",
    "GramAccumulator",
    "rank_figures",
    "rank_curve",
    "isotropic_baseline",
    "head_view",
    "wrap_forward_step",
    "MetricsLogger",
    "read_jsonl",
]
