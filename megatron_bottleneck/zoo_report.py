"""The zoo benchmark's report: ``zoo_report.md``, ``zoo.json`` and PNG plots, every figure read from the runs.

Per setting (SpamLang at a V/D, the text corpus) and head:

* final valid loss (the last validation), and the final training loss (smoothed as in the rank-sweep report,
  :func:`megatron_bottleneck.report.loss_curve`);
* tokens to reach a common loss L*: L* is the worst head's final smoothed training loss in that setting, and
  each head's first crossing is :func:`megatron_bottleneck.report.tokens_to_reach` on its smoothed curve (a
  figure marked ``<=`` is censored: the head was below L* at its first logged step);
* destroyed ratio and update cosine over training (the trainer's probe, ``logs/probe.jsonl``): first, last
  and mean; "n/a" where the probe does not measure the head (its reason is listed);
* parameters and forward FLOPs per token (:func:`megatron_bottleneck.heads.cost.head_cost`, analytic) and
  the parameters counted on the built head, head + loss time (forward + backward of ``head.loss``) and the
  bytes autograd saves for backward (:func:`megatron_bottleneck.zoo.inspect_heads`).

Plots: valid loss vs tokens, one line per head, per setting; destroyed ratio vs tokens likewise.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .plots import plot_series
from .report import Run, _fmt, _image, load_runs, loss_curve, tokens_to_reach

__all__ = ["write_zoo_report", "zoo_summary"]


def _probe_series(run: Run, key: str) -> List:
    """``(tokens, value)`` of ``probe/<key>`` (finite values only); tokens = step x tokens per step."""
    tps = run.params.get("tokens_per_step") or 1
    out = []
    for row in run.probe:
        v = row.get("probe/" + key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append((row.get("tokens", row["step"] * tps), float(v)))
    return out


def _head_stats(run: Run) -> Dict:
    """The run's head inspection (``run.json``'s ``head_stats``: a path relative to the run); {} if missing."""
    rel = run.params.get("head_stats")
    path = os.path.join(run.path, rel) if isinstance(rel, str) else None
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stats(series: List) -> Optional[Dict]:
    if not series:
        return None
    vals = [v for _, v in series]
    return {"first": vals[0], "last": vals[-1], "mean": sum(vals) / len(vals), "points": len(vals)}


def zoo_summary(root: str) -> Dict:
    """The figures of every zoo run under ``root`` (what ``zoo.json`` holds), grouped by setting."""
    runs = [r for r in load_runs(root) if r.params.get("kind") == "zoo"]
    if not runs:
        raise FileNotFoundError(f"no zoo runs (run.json with kind 'zoo') under {root!r}")
    settings: Dict[str, Dict] = {}
    for r in runs:
        settings.setdefault(r.params["setting"], {"setting": r.params["setting"], "data": r.params["data"],
                                                  "vocab_size": r.vocab, "hidden_size": r.hidden,
                                                  "vd": r.vocab / r.hidden, "runs": []})["runs"].append(r)
    out = []
    for name, s in sorted(settings.items(), key=lambda kv: (kv[1]["data"] != "spamlang", kv[1]["vocab_size"])):
        curves = {r.name: loss_curve(r) for r in s["runs"]}
        finals = {n: c[-1][1] for n, c in curves.items() if c}
        target = max(finals.values()) if finals else None
        rows = []
        dense_params = next((r.params.get("params") for r in s["runs"] if r.params.get("head_kind") == "dense"), None)
        for r in sorted(s["runs"], key=lambda r: (r.params.get("head_index", 0), r.name)):
            t, censored = tokens_to_reach(curves[r.name], target) if target is not None else (None, False)
            info = _head_stats(r)
            rows.append({
                "run": r.name, "head": r.params["head"], "head_kind": r.params.get("head_kind"),
                "params": r.params.get("params"), "params_counted": info.get("params_counted"),
                "params_vs_dense": (r.params["params"] / dense_params if dense_params and r.params.get("params")
                                    else None),
                "flops_per_token": r.params.get("flops_per_token"),
                "final_valid_loss": r.final("valid_loss"), "final_train_loss": finals.get(r.name),
                "tokens": r.final("tokens"),
                "tokens_to_target": t, "censored": censored,
                "destroyed_ratio": _stats(_probe_series(r, "destroyed_ratio")),
                "update_cosine": _stats(_probe_series(r, "update_cosine")),
                "probe": info.get("probe"), "probe_reason": info.get("probe_reason"),
                "time_ms": info.get("time_ms_min"), "cpu_ms": info.get("cpu_ms_min"),
                "saved_bytes": info.get("saved_bytes"), "timing_tokens": info.get("tokens"),
                "timing_device": info.get("device"),
            })
        out.append({k: s[k] for k in ("setting", "data", "vocab_size", "hidden_size", "vd")}
                   | {"target_loss": target, "heads": rows})
    return {"root": root, "settings": out}


def _cell(stats: Optional[Dict], probe: Optional[str]) -> str:
    if stats is None:
        return "n/a" if probe == "off" else "-"
    return f"{_fmt(stats['first'])} -> {_fmt(stats['last'])} (mean {_fmt(stats['mean'])})"


def write_zoo_report(root: str, out_dir: Optional[str] = None) -> str:
    """``zoo_report.md``, ``zoo.json`` and PNGs for the zoo runs under ``root``; returns the markdown path."""
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    summary = zoo_summary(root)
    runs = {r.name: r for r in load_runs(root)}
    first = next(iter(runs.values())).params
    lines = ["# Head zoo report", "",
             f"Every head trains {first.get('train_steps')} steps x {first.get('tokens_per_step')} tokens "
             f"(the same token budget), lr {first.get('lr')}, D = {first.get('hidden_size')}. Head parameter "
             "budgets: a head spec with an option `auto` (e.g. `stacked:width=auto`) has it set per setting to the "
             "value whose head has the parameter count closest to the dense head's (V D); every other head is taken "
             "as given. Each head's parameters and forward FLOPs per token (analytic, matrix products only; a "
             "training step is about 3x) stand beside its figures, and 'params vs dense' is its parameter count "
             "over the dense head's in the same setting: the budget each comparison is at.", "",
             "Tokens to reach L*: L* is the worst head's final training loss in the setting (smoothed over ~2% of "
             "the run), each head's tokens are its first crossing of L* on its smoothed curve; '<=' marks a "
             "censored figure (already below L* at the first logged step). Destroyed ratio and update cosine: "
             "the trainer's probe over training, first -> last (mean); n/a: the probe does not measure this head "
             "(reasons below). Head + loss: minimum wall and process CPU time (one thread) of forward + backward of "
             "`head.loss` on the timing tokens, and the bytes autograd saves for backward.", ""]
    refusals = {}
    for s in summary["settings"]:
        label = f"{s['setting']}" + (f" (SpamLang, V/D = {s['vd']:g})" if s["data"] == "spamlang"
                                     else f" (text, V = {s['vocab_size']}, V/D = {s['vd']:g})")
        lines += [f"## {label}", "", f"L* = {_fmt(s['target_loss'])}.", "",
                  "| head | params | params vs dense | fwd FLOPs/token | final valid loss | tokens to reach L* | "
                  "destroyed ratio | update cosine | head+loss ms (wall / CPU) | saved for backward (KiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for h in s["heads"]:
            if h["probe"] == "off":
                refusals[h["head_kind"]] = h["probe_reason"]
            tt = "-" if h["tokens_to_target"] is None else \
                ("<= " if h["censored"] else "") + _fmt(h["tokens_to_target"], 0)
            lines.append(
                f"| {h['head']} | {_fmt(h['params'])} | {_fmt(h['params_vs_dense'], 2)} | {_fmt(h['flops_per_token'])} | "
                f"{_fmt(h['final_valid_loss'])} | {tt} | {_cell(h['destroyed_ratio'], h['probe'])} | "
                f"{_cell(h['update_cosine'], h['probe'])} | {_fmt(h['time_ms'], 2)} / {_fmt(h['cpu_ms'], 2)} | "
                f"{_fmt(None if h['saved_bytes'] is None else h['saved_bytes'] / 1024, 1)} |")
        lines.append("")
        base = s["setting"]
        png = plot_series(os.path.join(out_dir, f"zoo_valid_{base}.png"), f"Valid loss, {label}",
                          {h["head"]: runs[h["run"]].series("valid_loss") for h in s["heads"]}, "tokens",
                          "valid loss", ylog=False)
        lines += _image(png)
        probed = {h["head"]: _probe_series(runs[h["run"]], "destroyed_ratio") for h in s["heads"]
                  if h["destroyed_ratio"]}
        if probed:
            png = plot_series(os.path.join(out_dir, f"zoo_destroyed_{base}.png"), f"Destroyed ratio, {label}",
                              probed, "tokens", "destroyed ratio", ylog=False)
            lines += _image(png)
    if refusals:
        lines += ["## Heads the probe does not measure", ""]
        lines += [f"* {kind}: {reason}" for kind, reason in sorted(refusals.items())]
        lines.append("")
    with open(os.path.join(out_dir, "zoo.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    path = os.path.join(out_dir, "zoo_report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
