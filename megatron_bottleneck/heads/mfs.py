"""Multi-facet softmax (after Chang & McCallum 2022, "Softmax Bottleneck Makes Language Models Unable to
Represent Multi-mode Word Distributions"), vocab-parallel.

A mixture of K softmaxes whose first facet is split over J partitions of the vocabulary: the logit of a word
in partition j of the first softmax comes from that partition's own facet vector. Head input h ``[..., D]``,
replicated facet projections P ``[F, D, D]`` (``proj``, F = J + K - 1) and mixture weights U ``[K, D]``
(``prior``), vocab-sharded W ``[V/tp, D]`` (``weight``)::

    f_e = tanh(P_e h)                                   # [..., F, D], e = 0 .. F - 1
    z_1,i = W_i f_{j(i)}         (facet 1: partition j(i) of word i, e = j(i) in 0 .. J - 1)
    z_k,i = W_i f_{J + k - 2}    (facets k = 2 .. K: one vector each)
    pi = softmax(U h)                                   # [..., K]
    u_i = log p(i | h) = logsumexp_k (log pi_k + z_k,i - lse_k),   lse_k = log sum_j exp(z_k,j)

The J partitions are contiguous blocks of the real vocabulary, ceil(V / J) ids each (block j holds ids
[j c, (j + 1) c)): with a frequency-ordered tokenizer, bands of frequency. Each rank computes its shard's
columns block by block (a slice of W per block: no copy of W). The original model also feeds the facets the
last layers' hidden states and the context; a head here sees only h, so every facet is a function of h.
J = 1 is the mixture of softmaxes with K components. Loss: materialised (this rank's ``[T, K, V/tp]``
logits; the fused op has one weight per pass and no partition switch), log pi, log p_k and u in float32 for
16-bit parameters (cast before the softmaxes and their all-reduces). Parameters: V D + (J + K - 1) D^2 + K D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext
from ..base.tp_autograd import softmax_dtype, tp_log_softmax
from .vocab_parallel import VocabParallelHead

__all__ = ["MultiFacetOptions", "MultiFacetHead"]


@dataclass
class MultiFacetOptions:
    """Options of the ``mfs`` head."""

    k: int = 3
    """K >= 1, the number of softmax facets (the mixture's components)."""
    partitions: int = 4
    """J >= 1, the vocabulary partitions of the first facet (contiguous blocks of ids)."""
    proj_std: Optional[float] = None
    """Std of the entries of P_e and U at init; None: 1/sqrt(D)."""

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise HeadConfigError(f"k must be an integer >= 1, got {self.k!r}")
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise HeadConfigError(f"partitions must be an integer >= 1, got {self.partitions!r}")
        if self.proj_std is not None and not self.proj_std > 0:
            raise HeadConfigError(f"proj_std must be > 0, got {self.proj_std}")


class MultiFacetHead(VocabParallelHead):
    """The ``mfs`` head (module docstring). ``proj`` P ``[J + K - 1, D, D]``, ``prior`` U ``[K, D]`` replicated."""

    def __init__(self, ctx: HeadBuildContext, options: MultiFacetOptions, init_std: Optional[float] = None):
        super().__init__(ctx, width=ctx.hidden_size, init_std=init_std)
        d, k, j = ctx.hidden_size, options.k, options.partitions
        if j > ctx.real_vocab_size:
            raise HeadConfigError(f"partitions={j} is more than the vocabulary's {ctx.real_vocab_size} words")
        std = options.proj_std if options.proj_std is not None else d ** -0.5
        self.k, self.partitions = k, j
        self.block = -(-int(ctx.real_vocab_size) // j)  # ceil(V / J) ids per partition
        self.add_replicated("proj", self.draw(j + k - 1, d, d, std=std))
        self.add_replicated("prior", self.draw(k, d, std=std))

    def replicated_part(self, p, h):
        f = torch.tanh(torch.einsum("...d,fed->...fe", h, p["proj"]))  # [..., F, D]
        prior_logits = torch.matmul(h, p["prior"].t())  # [..., K]
        log_pi = torch.log_softmax(prior_logits.to(softmax_dtype(prior_logits.dtype)), dim=-1)  # float32 for 16-bit
        return f, log_pi

    def _first_facet(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """z_1 ``[..., n_valid]``: this shard's columns block by block, each from its partition's facet."""
        start, stop = self.vocab_start, self.vocab_start + w.shape[0]
        pieces = []
        col = start
        while col < stop:
            j = col // self.block
            end = min(stop, (j + 1) * self.block)
            pieces.append(torch.matmul(f[..., j, :], w[col - start:end - start].t()))
            col = end
        return torch.cat(pieces, dim=-1) if pieces else f.new_zeros(f.shape[:-2] + (0,))

    def sharded_part(self, p, f, log_pi):
        w = self.weight_rows(p)  # [n_valid, D]
        z = [self._first_facet(w, f)]
        if self.k > 1:
            rest = torch.matmul(f[..., self.partitions:, :], w.t())  # [..., K - 1, n_valid]
            z.extend(rest.unbind(dim=-2))
        logp = tp_log_softmax(torch.stack(z, dim=-2), self.tp_group)  # [..., K, n_valid]
        return torch.logsumexp(log_pi.unsqueeze(-1) + logp, dim=-2)  # [..., n_valid]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, partitions={self.partitions}"
