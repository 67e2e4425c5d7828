"""Mixtape (Yang, Luong, Salakhutdinov & Le, NeurIPS 2019, "Mixtape: Breaking the Softmax Bottleneck
Efficiently"), vocab-parallel.

A mixture in logit space: K context vectors, each word's logit a gated sum of their dot products with the
word's embedding, the gates a function of both the context and the word. Head input h ``[..., D]``,
replicated context projections H ``[K, D, D]`` (``proj``) and gate projections U ``[K - 1, G, D]``
(``gate_proj``), replicated gate embeddings v ``[S + 1, K - 1, G]`` (``gate_vec``) and biases
b ``[S + 1, K - 1]`` (``gate_bias``), vocab-sharded W ``[V/tp, D]`` (``weight``)::

    c_k = tanh(H_k h)                                   # [..., K, D], context vectors
    q_n = tanh(U_n h)                                   # [..., K - 1, G], one per internal node of the tree
    l_n,i = v_{g(i), n} . q_n + b_{g(i), n}              # gate logits, g(i) = min(i, S): gate sharing
    pi_k,i = prod over the path root -> leaf k of sigma(l_n,i) (left) or 1 - sigma(l_n,i) (right)
    z_i = sum_k pi_k,i (W_i . c_k)                       # the logit of word i
    u = log_softmax(z) over the whole vocabulary

The gates form a sigmoid tree (K a power of two; K = 4: pi_1 = g1 g2, pi_2 = g1 (1 - g2), pi_3 = (1 - g1) g3,
pi_4 = (1 - g1)(1 - g3), g_n = sigma(l_n)), so sum_k pi_k,i = 1 for every word. Gate sharing: the S most
frequent words (ids 0 .. S - 1, a frequency-ordered tokenizer) have their own gate embedding; every other word
shares row S (the paper's S = 3000), which keeps the gate parameters at (S + 1)(K - 1)(G + 1) instead of
V (K - 1)(G + 1). Because the gates depend on the word, z is not W times one context vector: the log-probability
matrix is not bounded by rank D (with S = 0 it is, z = W sum_k pi_k c_k).

Each rank computes its shard's gate logits from slices of v (the frequent ids of the shard, then the shared row
broadcast): no weight-sized copy. Loss: materialised (this rank's ``[T, K, V/tp]`` dot products and gates),
the gates and the log-softmax in float32 for 16-bit parameters. Parameters: V D + K D^2 + (K - 1) G D +
(S + 1)(K - 1)(G + 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext
from ..base.tp_autograd import softmax_dtype, tp_log_softmax
from .vocab_parallel import VocabParallelHead

__all__ = ["MixtapeOptions", "MixtapeHead", "sigmoid_tree"]


@dataclass
class MixtapeOptions:
    """Options of the ``mixtape`` head."""

    k: int = 4
    """K, the number of context vectors: a power of two >= 2 (the gates' sigmoid tree has K - 1 nodes)."""
    frequent: int = 1024
    """S >= 0: words with id < S have their own gate embedding, the others share one (ids are frequency-ordered)."""
    gate_width: Optional[int] = None
    """G, the width of the gate projections q_n; None: D."""
    proj_std: Optional[float] = None
    """Std of the entries of H, U and v at init (b starts at 0); None: 1/sqrt(D)."""

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 2 or self.k & (self.k - 1):
            raise HeadConfigError(f"k must be a power of two >= 2 (the gates form a sigmoid tree), got {self.k!r}")
        if not isinstance(self.frequent, int) or self.frequent < 0:
            raise HeadConfigError(f"frequent must be an integer >= 0, got {self.frequent!r}")
        if self.gate_width is not None and (not isinstance(self.gate_width, int) or self.gate_width < 1):
            raise HeadConfigError(f"gate_width must be an integer >= 1, got {self.gate_width!r}")
        if self.proj_std is not None and not self.proj_std > 0:
            raise HeadConfigError(f"proj_std must be > 0, got {self.proj_std}")


def sigmoid_tree(gate_logits: torch.Tensor) -> torch.Tensor:
    """pi ``[..., K, n]`` from the K - 1 node logits ``[..., K - 1, n]`` of a complete binary tree in heap
    order (node m's children are 2m + 1 and 2m + 2; left takes sigma(l_m), right 1 - sigma(l_m)); leaves
    left to right. Each column sums to 1."""
    k = gate_logits.shape[-2] + 1
    g = torch.sigmoid(gate_logits)
    node = [torch.ones_like(gate_logits[..., 0, :])]
    for m in range(k - 1):
        node.append(node[m] * g[..., m, :])
        node.append(node[m] * (1 - g[..., m, :]))
    return torch.stack(node[k - 1:], dim=-2)


class MixtapeHead(VocabParallelHead):
    """The ``mixtape`` head (module docstring)."""

    sharded_part_params = ("gate_vec", "gate_bias")

    def __init__(self, ctx: HeadBuildContext, options: MixtapeOptions, init_std: Optional[float] = None):
        super().__init__(ctx, width=ctx.hidden_size, init_std=init_std)
        d, k = ctx.hidden_size, options.k
        g = options.gate_width or d
        std = options.proj_std if options.proj_std is not None else d ** -0.5
        self.k, self.gate_width = k, g
        self.frequent = min(int(options.frequent), int(ctx.real_vocab_size))
        self.add_replicated("proj", self.draw(k, d, d, std=std))
        self.add_replicated("gate_proj", self.draw(k - 1, g, d, std=std))
        self.add_replicated("gate_vec", self.draw(self.frequent + 1, k - 1, g, std=std))
        self.add_replicated("gate_bias", torch.zeros(self.frequent + 1, k - 1))

    def replicated_part(self, p, h):
        c = torch.tanh(torch.einsum("...d,ked->...ke", h, p["proj"]))  # [..., K, D]
        q = torch.tanh(torch.einsum("...d,ngd->...ng", h, p["gate_proj"]))  # [..., K - 1, G]
        return c, q

    def _gate_logits(self, p, q: torch.Tensor, n: int) -> torch.Tensor:
        """l ``[..., K - 1, n]`` for this shard's n real columns: own gates for ids < S, the shared row after."""
        start, s = self.vocab_start, self.frequent
        own = max(0, min(start + n, s) - start)  # columns of this shard with their own gate
        pieces = []
        if own:
            v, b = p["gate_vec"][start:start + own], p["gate_bias"][start:start + own]  # [own, K - 1, G], views
            pieces.append(torch.einsum("...ng,ing->...ni", q, v) + b.t())
        if n - own:
            shared = torch.einsum("...ng,ng->...n", q, p["gate_vec"][s]) + p["gate_bias"][s]  # [..., K - 1]
            pieces.append(shared.unsqueeze(-1).expand(*shared.shape, n - own))
        if not pieces:  # a shard of padding only
            return q.new_zeros(q.shape[:-1] + (0,))
        return torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]

    def sharded_part(self, p, c, q):
        w = self.weight_rows(p)  # [n, D]
        dots = torch.matmul(c, w.t())  # [..., K, n]
        dt = softmax_dtype(dots.dtype)
        pi = sigmoid_tree(self._gate_logits(p, q, w.shape[0]).to(dt))  # [..., K, n], float32 for 16-bit
        z = (pi * dots.to(dt)).sum(dim=-2)  # [..., n]
        return tp_log_softmax(z, self.tp_group)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", k={self.k}, frequent={self.frequent}, gate_width={self.gate_width}"
