"""The gradient probe: how much of the logit gradient survives the LM head (Godey & Artzi 2026,
"Lost in Backpropagation: The LM Head is a Gradient Bottleneck": destroyed ratio, rank of the logit gradient).

The math lives in :mod:`.stats` (per-step figures), :mod:`.spectrum` (rank analysis) and :mod:`.general`
(the visible energy through any head's per-token Jacobian, by conjugate gradients); every
integration (Megatron forward_step, the trainer, Lightning, Megatron-LM, Bridge) drives it through
:class:`GradientProbe`.
"""
from .general import CGResult, centred_gram_matvec, visible_energy_cg
from .probe import GradientProbe, ProbeConfig, head_view
from .spectrum import GramAccumulator, rank_curve, rank_figures
from .stats import StepAccumulator, isotropic_baseline

__all__ = ["GradientProbe", "ProbeConfig", "StepAccumulator", "GramAccumulator", "rank_figures", "rank_curve",
           "isotropic_baseline", "head_view", "CGResult", "centred_gram_matvec", "visible_energy_cg"]
