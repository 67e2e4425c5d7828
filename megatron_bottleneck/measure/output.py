"""What ``measure`` writes: ``measure.json`` per model, a Markdown table (one row per model), the rank curve
PNG and, for several models, a plot of the destroyed ratio across them.

One model: ``OUT/measure.json``, ``OUT/measure.md``, ``OUT/rank_curve.png``. Several: ``OUT/<i>-<name>/``
with those three each, plus ``OUT/measure.md`` (the table of all), ``OUT/measures.json`` (the list),
``OUT/rank_curves.png`` (one line per model) and ``OUT/destroyed_ratio.png``. PNGs need matplotlib
(``pip install 'megatron-bottleneck[plot]'``); without it they are skipped with a note in the Markdown.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

from ..plots import RankSeries, plot_destroyed, plot_rank_curves, plot_rank_detail

HEADER = ("| model | revision | V | D | tokens | documents | destroyed ratio | visible cosine | isotropic baseline "
          "| ‖G‖_F | per-document r (q05 / q50 / q95) | numerical rank (tokens) | paper |")
RULE = "|" + "|".join(["---"] * (HEADER.count("|") - 1)) + "|"


def _fmt(x, spec=".4f") -> str:
    return "" if x is None else format(x, spec)


def markdown_row(res: Dict) -> str:
    """The Markdown table row of one result (see :data:`HEADER`)."""
    doc = res.get("per_document") or {}
    spread = " / ".join(_fmt(doc.get(k), ".3f") for k in ("q05", "q50", "q95")) if doc else ""
    rank = res.get("rank") or {}
    rank_s = (f"{rank['numerical_rank']:.0f} ({rank['rank_tokens']:.0f})" if "numerical_rank" in rank else "")
    cells = [res.get("label") or res["model"], res.get("revision") or "", str(res["vocab_size"]),
             str(res["hidden_size"]), str(res["tokens"]), str(res["documents"]), _fmt(res["destroyed_ratio"]),
             _fmt(res["visible_cosine"]), _fmt(res["isotropic_baseline"]), _fmt(res["grad_norm"], ".3g"), spread,
             rank_s, res.get("paper") or ""]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: List[Dict]) -> str:
    return "\n".join([HEADER, RULE] + [markdown_row(r) for r in results]) + "\n"


def _slug(i: int, res: Dict) -> str:
    name = (res.get("label") or res["model"]).rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name.split("://")[-1])[-60:]
    return f"{i:02d}-{name}"


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _rank_png(results: List[Dict], path: str, title: str) -> Optional[str]:
    series = [RankSeries(label=short_name(r), vocab_size=int(r["vocab_size"]), curve=r["rank_curve"])
              for r in results if r.get("rank_curve")]
    return plot_rank_curves(series, path, title=title) if series else None


def _destroyed_png(results: List[Dict], path: str) -> Optional[str]:
    return plot_destroyed([(r.get("label") or r["model"], r["destroyed_ratio"], r["isotropic_baseline"])
                           for r in results], path, title="Destroyed ratio of the logit gradient")


def short_name(res: Dict) -> str:
    """A plot title's name: the label, else the hub id, else a path's last part (not a full local path)."""
    name = (res.get("label") or res["model"]).rstrip("/")
    return os.path.basename(name) if os.path.isabs(name) or name.startswith(".") else name


def _one(res: Dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "measure.json"), res)
    png = None
    if res.get("rank_curve"):
        series = RankSeries(label=short_name(res), vocab_size=int(res["vocab_size"]), curve=res["rank_curve"])
        png = plot_rank_detail(series, os.path.join(out, "rank_curve.png"))
    note = (f"\n![rank curve]({png})\n" if png else
            "\n(rank curve PNG skipped: no rank curve)\n" if not res.get("rank_curve") else
            "\n(rank curve PNG skipped: no matplotlib; pip install 'megatron-bottleneck[plot]')\n")
    with open(os.path.join(out, "measure.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table([res]) + note)


def write_outputs(results: List[Dict], out: str) -> str:
    """Write the files of the module docstring; returns the path of the Markdown table."""
    os.makedirs(out, exist_ok=True)
    if len(results) == 1:
        _one(results[0], out)
        return os.path.join(out, "measure.md")
    for i, res in enumerate(results):
        _one(res, os.path.join(out, _slug(i, res)))
    _write_json(os.path.join(out, "measures.json"), results)
    curves = _rank_png(results, os.path.join(out, "rank_curves.png"), "Rank of the logit gradient against tokens")
    bars = _destroyed_png(results, os.path.join(out, "destroyed_ratio.png"))
    lines = [markdown_table(results)]
    lines.append("" if bars else "(destroyed-ratio plot skipped: no matplotlib)")
    if bars:
        lines.append(f"![destroyed ratio]({os.path.basename(bars)})")
    if curves:
        lines.append(f"![rank curves]({os.path.basename(curves)})")
    path = os.path.join(out, "measure.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
