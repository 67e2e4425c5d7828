"""``ProbeConfig``: what the gradient probe (:class:`~.probe.GradientProbe`) measures and how often."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..base.errors import ConfigError

__all__ = ["ProbeConfig"]


@dataclass
class ProbeConfig:
    """What to measure and how often. Intervals count optimizer steps; 0 disables."""

    interval: int = 1
    """Cheap figures (norms, destroyed ratio, visible cosine, isotropic baseline) every N steps."""
    update_interval: int = 0
    """Update-direction cosine cos(-G, dZ) every N steps (one extra T x D x V/tp product per micro-batch)."""
    rank_interval: int = 0
    """Rank figures of G (Gram-based) every N steps, accumulated up to ``rank_token_budget`` tokens."""
    rank_token_budget: int = 2048
    """Tokens gathered for the rank figures (cost grows as T^2 V)."""
    rank_rtol: Optional[float] = None
    """Numerical-rank tolerance relative to sigma_max; None: max(T, V) x eps of the gradient's dtype."""
    energy_ks: Sequence[int] = (1, 10, 100, 1000)
    """k of the reported ``energy_top{k}`` (share of ||G||^2 in the top-k singular values)."""
    num_buckets: int = 0
    """Destroyed ratio per token-position bucket (0: off)."""
    vocab_size: Optional[int] = None
    """Real (unpadded) vocabulary; columns beyond it are Megatron's padding and excluded. None: the head's
    ``vocab_size`` (head contract) if it has one, else its full (padded) size, with a warning when that is padded."""
    slice_memory_mib: float = 64.0
    """Fused head + loss only: update and rank figures come from the logit gradient of the first tokens of each
    micro-batch, recomputed in at most this many MiB of float32 ``[tokens, V/tp]`` (update figures then describe
    that token slice: ``update_tokens`` says how many)."""
    log_dir: Optional[str] = None
    """Where ``probe.jsonl`` (and ``tensorboard/``) go; None: keep figures in ``history`` only."""
    tensorboard: bool = True
    """Also write TensorBoard events (skipped with one warning when tensorboard is not installed)."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project (skipped with one warning when wandb is not installed)."""
    general_tokens: int = 256
    """Non-linear heads (the general probe, :mod:`.general`): the figures of a step describe its first
    ``general_tokens`` tokens (the first micro-batches' rows in order, full sequence: the same tokens on every TP
    rank; ``probe_tokens`` says how many). Their head input ``[n, D]`` (and, unfused, G's shard ``[n, V/tp]``)
    is kept until the step's last backward."""
    mtp_depth: int = 0
    """Multi-token prediction (the model's ``mtp_num_layers`` / a HybridModel pattern with ``/``): which of the
    shared head's calls per forward the probe measures: 0 the main head (default), k in 1..n MTP depth k (the
    head on depth k's hidden state, with depth k's loss). Needs :meth:`GradientProbe.watch` on the model."""
    general_iterations: int = 32
    """Non-linear heads: conjugate-gradient iterations per step (a fixed count: every TP rank runs the same
    collectives, no host sync). Each is one JVP + one VJP through the head on the ``general_tokens`` tokens;
    the destroyed ratio is an upper bound at any count (``cg_residual``: the largest relative residual), exact
    once it reaches D (in exact arithmetic)."""

    def __post_init__(self):
        for key in ("interval", "update_interval", "rank_interval", "num_buckets"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"probe.{key} must be >= 0 (0 disables), got {getattr(self, key)}")
        if int(self.mtp_depth) < 0:
            raise ConfigError(f"probe.mtp_depth must be >= 0 (0: the main head), got {self.mtp_depth}")
        if self.rank_interval and self.rank_token_budget < 2:
            raise ConfigError(f"probe.rank_token_budget must be >= 2, got {self.rank_token_budget}")
        if not self.slice_memory_mib > 0:
            raise ConfigError(f"probe.slice_memory_mib must be > 0, got {self.slice_memory_mib}")
        for key in ("general_tokens", "general_iterations"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"probe.{key} must be >= 1, got {getattr(self, key)}")
