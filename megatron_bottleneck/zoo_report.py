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

With a learning-rate grid (``zoo.lrs``) or several seeds (``zoo.seeds``), per setting and head: the final valid
loss's mean over seeds at each learning rate, the best learning rate (lowest mean), the mean, sample standard
deviation and values there, and against dense at its own best learning rate the difference and the two-sided
p-value of Welch's t-test (unequal variances; :func:`welch_t_test`): "better" / "worse" than dense when
p < ``ALPHA``, else "not separable".

Plots: valid loss vs tokens, one line per head, per setting; destroyed ratio vs tokens likewise.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .plots import plot_series
from .report import Run, _fmt, _image, load_runs, loss_curve, tokens_to_reach

__all__ = ["write_zoo_report", "zoo_summary", "welch_t_test", "best_lr_table"]

ALPHA = 0.05
"""The significance level of the report's verdicts against dense."""


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz; Numerical Recipes
    6.4), converging for x < (a + 1) / (a + b + 2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def welch_t_test(a: List[float], b: List[float]) -> Optional[Dict]:
    """Welch's two-sample t-test of mean(a) = mean(b) (unequal variances).

    t = (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample variances s^2, df by Welch-Satterthwaite,
    two-sided p = I_{df / (df + t^2)}(df / 2, 1 / 2). None when a sample has fewer than 2 values. Both samples
    without spread: p = 1 for equal means, 0 otherwise (t = +-inf).
    """
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0.0:
        same = ma == mb
        return {"t": 0.0 if same else math.copysign(math.inf, ma - mb), "df": float(len(a) + len(b) - 2),
                "p": 1.0 if same else 0.0}
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return {"t": t, "df": df, "p": _betainc(df / 2.0, 0.5, df / (df + t * t))}


def _mean_std(vals: List[float]) -> Dict:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((x - m) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": m, "std": sd, "n": len(vals), "values": vals}


def best_lr_table(rows: List[Dict]) -> List[Dict]:
    """Per head (in the zoo's order): final valid loss by learning rate over seeds, the best learning rate and
    the figures there, and Welch's test against the dense head at its own best learning rate."""
    heads: Dict[str, Dict] = {}
    for r in rows:
        if r.get("final_valid_loss") is None or not math.isfinite(r["final_valid_loss"]):
            continue
        h = heads.setdefault(r["head"], {"head": r["head"], "head_kind": r.get("head_kind"), "by_lr": {}})
        h["by_lr"].setdefault(float(r["lr"]), []).append(float(r["final_valid_loss"]))
    for h in heads.values():
        h["by_lr"] = {lr: _mean_std(v) for lr, v in sorted(h["by_lr"].items())}
        h["best_lr"] = min(h["by_lr"], key=lambda lr: (h["by_lr"][lr]["mean"], lr))
        h["best"] = h["by_lr"][h["best_lr"]]
    dense = next((h for h in heads.values() if h["head_kind"] == "dense"), None)
    for h in heads.values():
        h["vs_dense"] = None
        if dense is not None and h is not dense:
            test = welch_t_test(h["best"]["values"], dense["best"]["values"])
            diff = h["best"]["mean"] - dense["best"]["mean"]
            verdict = "one seed: no test" if test is None else (
                ("better than dense" if diff < 0 else "worse than dense") if test["p"] < ALPHA else "not separable")
            h["vs_dense"] = {"difference": diff, "test": test, "verdict": verdict}
    return list(heads.values())


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
                "lr": r.params.get("lr"), "seed": r.params.get("seed"),
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
                   | {"target_loss": target, "heads": rows, "best_lr": best_lr_table(rows)})
    return {"root": root, "settings": out}


def _cell(stats: Optional[Dict], probe: Optional[str]) -> str:
    if stats is None:
        return "n/a" if probe == "off" else "-"
    return f"{_fmt(stats['first'])} -> {_fmt(stats['last'])} (mean {_fmt(stats['mean'])})"


def _label(h: Dict, grid: bool) -> str:
    return f"{h['head']} (lr {h['lr']:g}, seed {h['seed']})" if grid else h["head"]


def _best_lr_lines(table: List[Dict], lrs: List[float], seeds: List[int]) -> List[str]:
    head = " | ".join(f"lr {lr:g}" for lr in lrs)
    out = [f"Each head at its best learning rate: final valid loss over seeds {seeds} (mean +- sample std), the "
           f"mean at every learning rate tried, and Welch's t-test against dense at its own best learning rate "
           f"(two-sided; verdict at p < {ALPHA:g}).", "",
           f"| head | {head} | best lr | final valid loss (n) | vs dense | p (Welch) | verdict |",
           "|---|" + "---|" * len(lrs) + "---|---|---|---|---|"]
    for h in table:
        cells = " | ".join(_fmt(h["by_lr"][lr]["mean"]) if lr in h["by_lr"] else "-" for lr in lrs)
        b = h["best"]
        spread = f"{_fmt(b['mean'])} +- {_fmt(b['std'])} ({b['n']})" if b["std"] is not None else \
            f"{_fmt(b['mean'])} (1)"
        vs = h["vs_dense"]
        if vs is None:
            tail = "- | - | (the reference)" if h["head_kind"] == "dense" else "- | - | no dense head"
        else:
            p = "-" if vs["test"] is None else f"{vs['test']['p']:.3g}"
            tail = f"{vs['difference']:+.4g} | {p} | {vs['verdict']}"
        out.append(f"| {h['head']} | {cells} | {h['best_lr']:g} | {spread} | {tail} |")
    return out + [""]


def write_zoo_report(root: str, out_dir: Optional[str] = None) -> str:
    """``zoo_report.md``, ``zoo.json`` and PNGs for the zoo runs under ``root``; returns the markdown path."""
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    summary = zoo_summary(root)
    runs = {r.name: r for r in load_runs(root)}
    first = next(iter(runs.values())).params
    lines = ["# Head zoo report", "",
             f"Every head trains {first.get('train_steps')} steps x {first.get('tokens_per_step')} tokens "
             f"(the same token budget), D = {first.get('hidden_size')}; learning rates "
             f"{sorted({r.params.get('lr') for r in runs.values() if r.params.get('kind') == 'zoo'})}, seeds "
             f"{sorted({r.params.get('seed') for r in runs.values() if r.params.get('seed') is not None})}. Head parameter "
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
        lrs = sorted({h["lr"] for h in s["heads"] if h["lr"] is not None})
        seeds = sorted({h["seed"] for h in s["heads"] if h["seed"] is not None})
        grid = len(lrs) > 1 or len(seeds) > 1
        lines += [f"## {label}", "", f"L* = {_fmt(s['target_loss'])}.", "",
                  "| head | params | params vs dense | fwd FLOPs/token | final valid loss | tokens to reach L* | "
                  "destroyed ratio | update cosine | head+loss ms (wall / CPU) | saved for backward (KiB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for h in s["heads"]:
            if h["probe"] == "off":
                refusals[h["head_kind"]] = h["probe_reason"]
            tt = "-" if h["tokens_to_target"] is None else \
                ("<= " if h["censored"] else "") + _fmt(h["tokens_to_target"], 0)
            name = _label(h, grid)
            lines.append(
                f"| {name} | {_fmt(h['params'])} | {_fmt(h['params_vs_dense'], 2)} | {_fmt(h['flops_per_token'])} | "
                f"{_fmt(h['final_valid_loss'])} | {tt} | {_cell(h['destroyed_ratio'], h['probe'])} | "
                f"{_cell(h['update_cosine'], h['probe'])} | {_fmt(h['time_ms'], 2)} / {_fmt(h['cpu_ms'], 2)} | "
                f"{_fmt(None if h['saved_bytes'] is None else h['saved_bytes'] / 1024, 1)} |")
        lines.append("")
        if grid:
            lines += _best_lr_lines(s["best_lr"], lrs, seeds)
        base = s["setting"]
        png = plot_series(os.path.join(out_dir, f"zoo_valid_{base}.png"), f"Valid loss, {label}",
                          {_label(h, grid): runs[h["run"]].series("valid_loss") for h in s["heads"]}, "tokens",
                          "valid loss", ylog=False)
        lines += _image(png)
        probed = {_label(h, grid): _probe_series(runs[h["run"]], "destroyed_ratio") for h in s["heads"]
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
