"""The gradient probe: how much of the logit gradient survives the LM head (Godey & Artzi 2026,
"Lost in Backpropagation: The LM Head is a Gradient Bottleneck": destroyed ratio, rank of the logit gradient).

:class:`GradientProbe` (:mod:`.probe`) is the front every integration (Megatron forward_step, the trainer,
Lightning, Megatron-LM, Bridge) drives: hooks, step boundaries, the one reduction per step, reporting. What it
measures is a strategy behind one interface (:mod:`.strategy`): :mod:`.closed_form` for linear heads (the math in
:mod:`.stats`, per-step figures, and :mod:`.spectrum`, rank analysis), :mod:`.cg` for non-linear heads (the
math in :mod:`.general`: the visible energy through any head's per-token Jacobian, by conjugate gradients).
"""
from .general import CGResult, centred_gram_matvec, visible_energy_cg
from .probe import GradientProbe, ProbeConfig, head_view
from .spectrum import GramAccumulator, rank_curve, rank_figures
from .linalg import isotropic_baseline
from .stats import StepAccumulator

__all__ = ["GradientProbe", "ProbeConfig", "StepAccumulator", "GramAccumulator", "rank_figures", "rank_curve",
           "isotropic_baseline", "head_view", "CGResult", "centred_gram_matvec", "visible_energy_cg"]
