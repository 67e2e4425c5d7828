"""PNG plots drawn the way the paper draws them (matplotlib, imported only when a plot is drawn).

* :func:`plot_series`: x-y series; the y axis goes to a log scale by itself where the positive values span more
  than two orders of magnitude (a loss of 1e-7 and one of 6e-3 are not drawn as the same zero).
* :func:`plot_rank_curves`: the numerical rank of the logit gradient G (T x V) against the batch tokens T, one
  line per model or per vocabulary size, with its ceiling ``min(T, V - 1)`` dotted (the paper's Figure 2; the
  rows of G = P - Y sum to zero, so rank(G) <= V - 1), series sorted numerically by V.
* :func:`plot_rank_detail`: one model's rank curve in full: numerical rank, effective rank and the components
  holding 70 / 90 / 99 / 99.9 % of G's energy against T, with the ceiling ``min(T, V - 1)`` (``measure``).
* :func:`plot_destroyed`: the destroyed ratio of several models or revisions (``measure``), in the order given
  (along training for revisions), with each one's isotropic baseline as a tick.

Every function returns the PNG's file name, or None where matplotlib is not installed
(``pip install 'megatron-bottleneck[plot]'``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["RankSeries", "plot_series", "plot_rank_curves", "plot_rank_detail", "plot_destroyed", "wants_log_scale"]

LOG_SPAN = 100.0
"""A y axis whose positive values span more than this factor (max / min) is drawn on a log scale."""


@dataclass
class RankSeries:
    """One rank curve: ``curve`` is a list of ``{"tokens": T, "numerical_rank": r, ...}`` (as
    :func:`megatron_bottleneck.probe.spectrum.rank_curve` writes them); ``vocab_size`` is V (the ceiling's V)."""

    label: str
    vocab_size: int
    curve: List[Dict] = field(default_factory=list)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wants_log_scale(values: Sequence[Optional[float]]) -> bool:
    """Whether values (all positive) span more than :data:`LOG_SPAN`; a zero or negative value keeps it linear."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2 or min(vals) <= 0:
        return False
    return max(vals) / min(vals) > LOG_SPAN


def plot_series(path: str, title: str, series: Dict[str, List[Tuple[float, Optional[float]]]], xlabel: str,
                ylabel: str, xlog_base: Optional[int] = None, ylog: Union[bool, str] = "auto",
                note: Optional[str] = None) -> Optional[str]:
    """One PNG of x-y series (a label containing 'baseline' is drawn dashed).

    ylog: True, False, or "auto" (:func:`wants_log_scale` over every series' y values). note: a line of text
    drawn under the title (what a reader must know to read the plot)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ys = []
    for label, pts in series.items():
        pts = [p for p in pts if p[1] is not None]
        if pts:
            style = "--" if "baseline" in label else ("-o" if len(pts) < 20 else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            ys += [p[1] for p in pts]
    _finish(ax, title, xlabel, ylabel, note)
    if xlog_base:
        ax.set_xscale("log", base=xlog_base)
    if ylog is True or (ylog == "auto" and wants_log_scale(ys)):
        ax.set_yscale("log")
    return _save(fig, plt, path)


def plot_rank_curves(series: Sequence[RankSeries], path: str,
                     title: str = "Numerical rank of the logit gradient vs batch tokens",
                     note: Optional[str] = None) -> Optional[str]:
    """The paper's Figure 2: numerical rank of G against T on log-log axes, one line per series (sorted by V),
    and for each distinct V its ceiling ``min(T, V - 1)`` dotted in the same colour as its first series."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ceilings: Dict[int, str] = {}
    t_max = 1
    for s in sorted(series, key=lambda s: (int(s.vocab_size), s.label)):
        pts = [(c["tokens"], c["numerical_rank"]) for c in s.curve if c.get("numerical_rank") is not None]
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [max(p[1], 1) for p in pts], "-o" if len(pts) < 20 else "-",
                        markersize=3, label=s.label)
        ceilings.setdefault(int(s.vocab_size), line.get_color())
        t_max = max(t_max, max(p[0] for p in pts))
    for v, color in ceilings.items():
        ts = sorted({1, min(t_max, v - 1), t_max} | {2 ** k for k in range(1, t_max.bit_length())})
        ts = [t for t in ts if t <= t_max]
        ax.plot(ts, [min(t, v - 1) for t in ts], ":", color=color, alpha=0.8, label=f"min(T, V-1), V={v}")
    _finish(ax, title, "batch tokens T", "numerical rank of G", note)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _save(fig, plt, path)


ENERGY_KEYS = (("components_for_70pct", "70% of energy"), ("components_for_90pct", "90%"),
               ("components_for_99pct", "99%"), ("components_for_99.9pct", "99.9%"))


def plot_rank_detail(series: RankSeries, path: str, title: Optional[str] = None) -> Optional[str]:
    """One rank curve on log-log axes: the numerical rank of G (T x V) against T (solid), its effective rank
    (dashed), the number of singular directions holding 70 / 90 / 99 / 99.9 % of ||G||_F^2 (thin) and the
    ceiling ``min(T, V - 1)`` (dotted)."""
    plt = _pyplot()
    if plt is None:
        return None
    curve = [c for c in series.curve if c.get("numerical_rank") is not None]
    if not curve:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [c["tokens"] for c in curve]
    ax.plot(ts, [max(c["numerical_rank"], 1) for c in curve], "-o", markersize=3, color="tab:blue",
            label="numerical rank")
    eff = [(c["tokens"], c.get("effective_rank")) for c in curve if c.get("effective_rank") == c.get("effective_rank")
           and c.get("effective_rank") is not None]
    if eff:
        ax.plot([e[0] for e in eff], [max(e[1], 1) for e in eff], "--", color="tab:orange", label="effective rank")
    for (key, label), alpha in zip(ENERGY_KEYS, (0.35, 0.5, 0.7, 0.9)):
        pts = [(c["tokens"], c[key]) for c in curve if c.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", linewidth=0.9, color="tab:green", alpha=alpha,
                    label=f"components for {label}")
    v = int(series.vocab_size)
    grid = sorted(set(ts) | {min(max(ts), v - 1)})
    ax.plot(grid, [min(t, v - 1) for t in grid], ":", color="gray", label=f"min(T, V-1), V={v}")
    _finish(ax, title or f"Rank of the logit gradient: {series.label}", "tokens T", "rank of G", None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _save(fig, plt, path)


def plot_destroyed(points: Sequence[Tuple[str, float, Optional[float]]], path: str,
                   title: str = "Destroyed ratio of the logit gradient") -> Optional[str]:
    """Bars of ``(label, destroyed ratio, isotropic baseline or None)`` in the given order, y from 0 to 1, the
    baseline drawn as a black tick on each bar."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(points) + 2), 4))
    xs = list(range(len(points)))
    ax.bar(xs, [p[1] for p in points], color="tab:red", alpha=0.8, label="destroyed ratio")
    base = [(x, p[2]) for x, p in zip(xs, points) if p[2] is not None]
    if base:
        ax.plot([b[0] for b in base], [b[1] for b in base], "k_", markersize=18, label="isotropic baseline")
    ax.set_xticks(xs)
    ax.set_xticklabels([p[0] for p in points], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    _finish(ax, title, "", "||G - G_vis|| / ||G||", None)
    return _save(fig, plt, path)


def _finish(ax, title: str, xlabel: str, ylabel: str, note: Optional[str]) -> None:
    ax.set_title(title if not note else f"{title}\n{note}", fontsize=10 if not note else 9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)
