"""Rank analysis of the logit gradient G (T x V) from its Gram matrix K = G G^T (T x T).

Under vocab-parallel TP, K = sum over vocab shards of G_s G_s^T: one T x T all-reduce, never a V-sized
gather. Eigenvalues of K are sigma_i^2. Reported (sigma sorted descending):

* numerical rank: #{sigma_i > tol}, tol = sigma_max * max(T, V) * eps unless ``rtol`` is given (then
  tol = sigma_max * rtol); eps is float32's for float32/bf16/fp16 gradients (bf16's would exceed 1/V)
  and float64's for float64 gradients;
* effective rank (Roy & Vetterli 2007): exp(-sum p_i log p_i), p_i = sigma_i / sum sigma;
* energy of the top k components: sum_{i<=k} sigma_i^2 / sum sigma_i^2, and the number of components
  that hold 70 / 90 / 99 / 99.9 % of it;
* Eckart-Young-Mirsky residual at rank k: sqrt(sum_{i>k} sigma_i^2) / ||G||_F, the smallest relative
  error of any rank-k approximation of G (k = 2D: the best a single first-order step can do);
* the rank-versus-batch-tokens curve: the same ranks for the first t tokens, from the leading t x t
  block of K (the Gram of those tokens), t on a doubling grid.

:class:`GramAccumulator` gathers tokens across micro-batches and steps until a token budget: it keeps
the local G rows seen so far (float64, on their device) to form the cross terms of each new block, and
forms every product in float64 (the rank tolerance sits below what a float32 Gram resolves).
Masked tokens (zero rows) are kept and count toward the budget.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core.utils import get_pg_size

from ..base.head import HeadView

ENERGY_LEVELS = (0.7, 0.9, 0.99, 0.999)


def _tolerance(sigma_max: float, tokens: int, vocab: int, eps: float, rtol: Optional[float]) -> float:
    return sigma_max * (rtol if rtol is not None else max(tokens, vocab) * eps)


def rank_figures(
    gram: torch.Tensor,
    vocab_size: int,
    eps: float,
    rtol: Optional[float] = None,
    energy_ks: Iterable[int] = (1, 10, 100, 1000),
    residual_ranks: Iterable[int] = (),
) -> Dict[str, float]:
    """Figures of G from K = G G^T (float64 recommended). ``eps``: machine epsilon of G's dtype."""
    lam = torch.linalg.eigvalsh(gram.double()).flip(0).clamp(min=0).cpu()
    return figures_from_eigenvalues(lam, vocab_size, eps, rtol, energy_ks, residual_ranks)


def figures_from_eigenvalues(
    lam: torch.Tensor,
    vocab_size: int,
    eps: float,
    rtol: Optional[float] = None,
    energy_ks: Iterable[int] = (1, 10, 100, 1000),
    residual_ranks: Iterable[int] = (),
) -> Dict[str, float]:
    """:func:`rank_figures` from the eigenvalues sigma_i^2 of K, sorted descending (a host tensor)."""
    lam = lam.double().clamp(min=0)
    tokens = lam.shape[0]
    sigma = lam.sqrt()
    total2 = float(lam.sum())
    out: Dict[str, float] = {"rank_tokens": float(tokens)}
    if total2 <= 0 or not math.isfinite(total2):
        return {**out, "numerical_rank": 0.0, "effective_rank": float("nan")}
    tol = _tolerance(float(sigma[0]), tokens, vocab_size, eps, rtol)
    out["numerical_rank"] = float((sigma > tol).sum())
    out["rank_tolerance"] = tol
    p = sigma / sigma.sum()
    p = p[p > 0]
    out["effective_rank"] = float(torch.exp(-(p * p.log()).sum()))
    cum = lam.cumsum(0) / total2
    for k in energy_ks:
        if k <= tokens:
            out[f"energy_top{k}"] = float(cum[k - 1])
    for level in ENERGY_LEVELS:
        out[f"components_for_{level * 100:g}pct"] = float(int((cum < level - 1e-12).sum()) + 1)
    for k in residual_ranks:
        rest = float(lam[k:].sum()) if k < tokens else 0.0
        out[f"eym_residual_rank{k}"] = math.sqrt(max(rest, 0.0) / total2)
    return out


def curve_grid(tokens: int) -> List[int]:
    """t = 2, 4, 8, ..., T: the token counts of the rank-versus-tokens curve."""
    return sorted({min(2 ** i, tokens) for i in range(1, max(1, math.ceil(math.log2(tokens))) + 1)})


def rank_curve(gram: torch.Tensor, vocab_size: int, eps: float, rtol: Optional[float] = None) -> List[Dict]:
    """Numerical rank (with its ``rank_tolerance``), effective rank and the components holding 70 / 90 / 99 /
    99.9 % of the energy (``components_for_70pct`` ...) of the first t tokens, t = 2, 4, 8, ..., T."""
    return curve_from_eigenvalues(curve_eigenvalues(gram).cpu(), gram.shape[0], vocab_size, eps, rtol)


def curve_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """The eigenvalues (descending) of each leading t x t block of the grid, concatenated (device work)."""
    return torch.cat([torch.linalg.eigvalsh(gram[:t, :t].double()).flip(0) for t in curve_grid(gram.shape[0])])


def curve_from_eigenvalues(lams: torch.Tensor, tokens: int, vocab_size: int, eps: float,
                           rtol: Optional[float] = None) -> List[Dict]:
    out, pos = [], 0
    for t in curve_grid(tokens):
        fig = figures_from_eigenvalues(lams[pos:pos + t], vocab_size, eps, rtol, energy_ks=(), residual_ranks=())
        pos += t
        point = {"tokens": t, "numerical_rank": fig["numerical_rank"], "effective_rank": fig["effective_rank"]}
        point.update({k: v for k, v in fig.items() if k == "rank_tolerance" or k.startswith("components_for_")})
        out.append(point)
    return out


class GramAccumulator:
    """Accumulate G G^T over micro-batches and steps until ``token_budget`` tokens.

    :meth:`add` is local work; :meth:`local_payload` (the local T x T Gram, a sum over this rank's vocab shard)
    is SUM-all-reduced over TP by the caller, :meth:`eigenvalues` runs the eigendecompositions on the device,
    and :meth:`host_figures` turns their one transfer into figures. :meth:`finalize` does it all.
    """

    def __init__(self, token_budget: int):
        self.token_budget = int(token_budget)
        self.rows: List[torch.Tensor] = []
        self.blocks: List[List[torch.Tensor]] = []  # blocks[i][j] = rows_i rows_j^T, j <= i
        self.tokens = 0
        self.vocab_size = 0
        self.eps = torch.finfo(torch.float32).eps

    @property
    def full(self) -> bool:
        return self.tokens >= self.token_budget

    def state_dict(self) -> Dict:
        """The accumulation so far, on the CPU (a checkpoint of this rank's vocabulary shard)."""
        return {"token_budget": self.token_budget, "tokens": self.tokens, "vocab_size": self.vocab_size,
                "eps": self.eps, "rows": [r.detach().cpu() for r in self.rows],
                "blocks": [[b.detach().cpu() for b in row] for row in self.blocks]}

    @classmethod
    def from_state_dict(cls, state: Dict, device=None) -> "GramAccumulator":
        """The accumulator :meth:`state_dict` saved, its tensors on ``device``."""
        g = cls(state["token_budget"])
        g.tokens, g.vocab_size, g.eps = state["tokens"], state["vocab_size"], state["eps"]
        g.rows = [r.to(device) for r in state["rows"]]
        g.blocks = [[b.to(device) for b in row] for row in state["blocks"]]
        return g

    def take(self, rows: int) -> int:
        """How many of a micro-batch's ``rows`` tokens go in (the rest of the budget)."""
        return max(0, min(int(rows), self.token_budget - self.tokens))

    def add(self, grad: torch.Tensor, view: HeadView, rows: Optional[int] = None) -> None:
        """grad: a micro-batch's logit-gradient shard [s, b, V_local] or [T, V_local] (local work only).
        ``rows``: take exactly its first ``rows`` tokens, already counted in ``tokens`` by the caller (the probe
        counts them before any work that could fail, so every TP rank agrees on when the Gram is full)."""
        if rows is None and self.full:
            return
        self.vocab_size = view.vocab_size
        # eps of the compute dtype: at least float32's. bf16/fp16 gradients still come from a float32
        # cross-entropy, and bf16's eps (2^-8) times max(T, V) would put the tolerance above sigma_max.
        self.eps = torch.finfo(torch.float64 if grad.dtype == torch.float64 else torch.float32).eps
        x = grad.reshape(-1, grad.shape[-1])[:, : view.valid_rows()]
        x = x[: (self.take(x.shape[0]) if rows is None else rows)].detach().double()
        # float64 products: sigma_i = sqrt(eigenvalue), so a float32 Gram would blur every
        # sigma below sqrt(eps32) * sigma_max ~ 3e-4 sigma_max, above the rank tolerance.
        self.blocks.append([x @ r.t() for r in self.rows] + [x @ x.t()])
        self.rows.append(x)
        if rows is None:
            self.tokens += x.shape[0]

    def gram(self) -> torch.Tensor:
        n = len(self.rows)
        rows = []
        for i in range(n):
            row = [self.blocks[i][j] if j <= i else self.blocks[j][i].t() for j in range(n)]
            rows.append(torch.cat(row, dim=1))
        return torch.cat(rows, dim=0)

    def local_payload(self) -> torch.Tensor:
        """The local Gram, flat (``tokens**2`` float64); resets the accumulator."""
        k = self.gram().reshape(-1)
        self.rows, self.blocks = [], []
        return k

    def eigenvalues(self, flat: torch.Tensor, tokens: int) -> torch.Tensor:
        """Eigenvalues of the reduced Gram (descending), then those of the curve's leading blocks (device)."""
        k = flat.reshape(tokens, tokens)
        return torch.cat([torch.linalg.eigvalsh(k).flip(0), curve_eigenvalues(k)])

    def host_figures(self, lams: torch.Tensor, tokens: int, finite: bool, rtol: Optional[float] = None,
                     energy_ks: Sequence[int] = (1, 10, 100, 1000), residual_ranks: Sequence[int] = ()) -> Dict:
        if not finite:
            return {"numerical_rank": float("nan"), "effective_rank": float("nan"), "nonfinite_grad": 1.0}
        out = figures_from_eigenvalues(lams[:tokens].clamp(min=0), self.vocab_size, self.eps, rtol, energy_ks,
                                       residual_ranks)
        out["rank_curve"] = curve_from_eigenvalues(lams[tokens:], tokens, self.vocab_size, self.eps, rtol)
        return out

    def finalize(self, tp_group=None, rtol: Optional[float] = None, energy_ks: Sequence[int] = (1, 10, 100, 1000),
                 residual_ranks: Sequence[int] = ()) -> Dict:
        """All-reduce the Gram over TP and return :func:`rank_figures` plus ``rank_curve``; resets."""
        if not self.rows:
            return {}
        tokens = self.tokens
        flat = self.local_payload()
        if get_pg_size(tp_group) > 1:
            dist.all_reduce(flat, group=tp_group)
        finite = bool(torch.isfinite(flat).all())
        lams = self.eigenvalues(flat, tokens).cpu() if finite else None
        self.tokens = 0
        return self.host_figures(lams, tokens, finite, rtol, energy_ks, residual_ranks)
