"""Mixture of softmaxes (Yang et al. 2018, "Breaking the Softmax Bottleneck"), vocab-parallel.

With K components, head input h ``[..., D]``, replicated P_k ``[D, D]`` (``proj``, ``[K, D, D]``) and U
``[K, D]`` (``prior``), vocab-sharded W ``[V/tp, D]`` (``weight``)::

    h_k = tanh(P_k h)                       # [..., K, D]
    pi  = softmax(U h)                      # [..., K], the mixture weights
    p(i | h) = sum_k pi_k softmax(W h_k)_i
    u_i = log p(i | h) = logsumexp_k (log pi_k + W_i h_k - lse_k),   lse_k = log sum_j exp(W_j h_k)

Loss -log p(y) = -logsumexp_k(log pi_k + log p_k(y)), computed stably in log space. The GEMMs run in the
parameters' dtype; log pi, log p_k and u in float32 for 16-bit parameters (cast before the softmaxes and their
all-reduces: :func:`~megatron_bottleneck.base.tp_autograd.tp_log_softmax`). Fused (``fused=True``,
the default): K passes of :func:`megatron_bottleneck.ops.linear_cross_entropy` sharing W (each an online
log-sum-exp over the vocabulary chunks, no ``[T, V]`` logits), log p_k(y) = -CE_k, combined with log pi by a
log-sum-exp over k; gradients through the op's backward (it takes any per-token dL/dCE_k). Label smoothing
and z-loss need the whole distribution: refused there (use ``fused=false``, which materialises
``[T, K, V/tp]``). Parameters: V D + K D^2 + K D. Rank of log p as a T x V matrix: not bounded by D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.utils import get_pg_size

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext
from ..base.tp_autograd import softmax_dtype, tp_log_softmax
from ..ops import linear_cross_entropy
from .contract import FusedLossConfig, reduced_loss, tp_region_input
from .vocab_parallel import VocabParallelHead, vocab_parallel_nll

__all__ = ["MixtureOfSoftmaxesOptions", "MixtureOfSoftmaxesHead"]


@dataclass
class MixtureOfSoftmaxesOptions:
    """Options of the ``mos`` head."""

    k: int = 4
    """K >= 1, the number of softmax components."""
    proj_std: Optional[float] = None
    """Std of the entries of P_k and U at init; None: 1/sqrt(D) (so P_k h has unit-order entries)."""
    fused: bool = True
    """The loss through K fused passes (no [T, V] logits); false: materialise [T, K, V/tp]."""

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise HeadConfigError(f"k must be an integer >= 1, got {self.k!r}")
        if self.proj_std is not None and not self.proj_std > 0:
            raise HeadConfigError(f"proj_std must be > 0, got {self.proj_std}")


class MixtureOfSoftmaxesHead(VocabParallelHead):
    """The ``mos`` head (module docstring). ``proj`` P ``[K, D, D]``, ``prior`` U ``[K, D]`` replicated."""

    def __init__(self, ctx: HeadBuildContext, options: MixtureOfSoftmaxesOptions, init_std: Optional[float] = None):
        super().__init__(ctx, width=ctx.hidden_size, init_std=init_std)
        d, k = ctx.hidden_size, options.k
        std = options.proj_std if options.proj_std is not None else d ** -0.5
        self.k, self.fused = k, options.fused
        self.add_replicated("proj", self.draw(k, d, d, std=std))
        self.add_replicated("prior", self.draw(k, d, std=std))

    def replicated_part(self, p, h):
        hk = torch.tanh(torch.einsum("...d,ked->...ke", h, p["proj"]))  # [..., K, D]
        prior_logits = torch.matmul(h, p["prior"].t())  # [..., K]
        log_pi = torch.log_softmax(prior_logits.to(softmax_dtype(prior_logits.dtype)), dim=-1)  # float32 for 16-bit
        return hk, log_pi

    def sharded_part(self, p, hk, log_pi):
        z = torch.matmul(hk, self.weight_rows(p).t())  # [..., K, n_valid]
        logp = tp_log_softmax(z, self.tp_group)
        return torch.logsumexp(log_pi.unsqueeze(-1) + logp, dim=-2)  # [..., n_valid]

    def loss(self, hidden, labels, weight=None, *, config=None, stats=None, logit_scale=1.0,
             weight_grad_into_main_grad=False):
        """-log p(y) ``[s, b]`` float32: fused (K passes of the fused op) or materialised (``fused=False``)."""
        config = config or FusedLossConfig()
        if not self.fused:
            return super().loss(hidden, labels, weight, config=config, logit_scale=logit_scale)
        self.check_loss_options(config, logit_scale)
        if config.label_smoothing or config.ce_weight is not None:
            raise HeadConfigError("the fused mixture-of-softmaxes loss has no label smoothing and no class weights "
                                  "(it sums per-component losses): set label_smoothing=0 and ce_weight=None, or the "
                                  "head option fused=false")
        p = self._params(weight)
        hk, log_pi = self.replicated_part(p, hidden)
        hk = tp_region_input(hk, self.tp_group, self.sequence_parallel)  # [s, b, K, D]
        if self.sequence_parallel and get_pg_size(self.tp_group) > 1:
            # log pi enters replicated code only: all-gathered with a split (not summed) backward
            log_pi = gather_from_sequence_parallel_region(log_pi, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        budget = None if config.memory_budget_mib is None else int(config.memory_budget_mib * 2 ** 20)
        w = p["weight"]
        ce = torch.stack([linear_cross_entropy(
            hk[..., j, :], w, labels, tp_group=self.tp_group, vocab_start=self.vocab_start,
            vocab_size=self.vocab_size, memory_budget_bytes=budget, check_labels=False, kernel=config.kernel,
            ) for j in range(self.k)], dim=-1)  # [s, b, K]; W's gradient summed by autograd over the K passes
        loss = -torch.logsumexp(log_pi.float() - ce, dim=-1)
        loss = torch.where(labels != -100, loss, loss.new_zeros(()))
        return reduced_loss(loss, torch.zeros_like(loss), labels, config, self.vocab_size)

    def materialised_loss(self, hidden, labels, weight=None, label_smoothing: float = 0.0, spec=None):
        """The materialised loss whatever ``fused`` says (tests compare it with the fused one)."""
        return vocab_parallel_nll(self.log_probs(hidden, weight), labels, self.vocab_start, self.vocab_size,
                                  self.tp_group, label_smoothing, spec=spec)
