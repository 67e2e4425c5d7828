"""Markdown + PNG report from run logs (one directory per run, as the trainer and sweep write them).

A run directory holds ``run.json`` (what varies: ``vocab_size``, ``hidden_size``, ``head_rank`` (None =
dense), ``lr``, optional ``coverage``), ``logs/metrics.jsonl`` (``step``, ``tokens``, ``loss``,
``valid_loss``) and, with the probe on, ``logs/probe.jsonl`` (``probe/destroyed_ratio``, ...).

Three kinds of run directory are read, detected per directory: the sweep's and demo's (``run.json``), our
trainer's (``logs/config.yaml``, e.g. from ``launch/rank_sweep.sbatch``), and Megatron-LM's ``pretrain_gpt.py``
run through ``python -m megatron_bottleneck.megatron_lm`` (``logs/megatron_lm*.log``: its stdout, as
``launch/megatron_lm.sbatch`` appends it, one file per node; the probe's ``logs/probe.jsonl``). For those, what
varies and the metrics are parsed from Megatron-LM's own log (:func:`parse_megatron_lm_log`).

Figures: loss curves per vocabulary size and per head rank, destroyed ratio against V/D and against the
head rank (with the isotropic baseline), the logit-gradient rank against batch tokens, and
tokens-to-reach-a-loss ratios (the paper's "up to 16x"). Every number in the markdown is read from the
logs; nothing is assumed.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

from .base.sinks import read_jsonl
from .plots import RankSeries, plot_rank_curves, plot_series


@dataclass
class Run:
    name: str
    path: str
    params: Dict
    metrics: List[Dict] = field(default_factory=list)
    probe: List[Dict] = field(default_factory=list)

    @property
    def vocab(self) -> int:
        return int(self.params["vocab_size"])

    @property
    def hidden(self) -> int:
        return int(self.params["hidden_size"])

    @property
    def rank(self) -> int:
        r = self.params.get("head_rank")
        return self.hidden if r is None else int(r)

    def series(self, key: str, source: str = "metrics"):
        rows = self.metrics if source == "metrics" else self.probe
        return [(r.get("tokens", r["step"]), r[key]) for r in rows if r.get(key) is not None]

    def final(self, key: str, source: str = "metrics", last: int = 1) -> Optional[float]:
        vals = [v for _, v in self.series(key, source)][-last:]
        return sum(vals) / len(vals) if vals else None

    def mean_probe(self, key: str) -> Optional[float]:
        vals = [v for _, v in self.series("probe/" + key, "probe") if v is not None and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None


def _params_from_config(path: str) -> Dict:
    """What varies, read from a trainer's saved ``logs/config.yaml`` (runs launched one by one, e.g. by the
    Slurm job array over head ranks, have no run.json): they count as a head-rank sweep."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    m = cfg["model"]
    return {"vocab_size": m["vocab_size"], "hidden_size": m["hidden_size"], "head_rank": m.get("head_rank"),
            "lr": cfg["optim"]["lr"], "rank_sweep": True}


# ------------------------------------------------------------------------------ Megatron-LM's stdout
_MLM_ARGS_START = re.compile(r"-{3,} arguments -{3,}")
_MLM_ARGS_END = re.compile(r"-{3,} end of arguments -{3,}")
_MLM_ARG = re.compile(r"^\s+([A-Za-z_]\w*) \.{2,} (.*?)\s*$")
_MLM_VOCAB = re.compile(r"> padded vocab \(size: (\d+)\) with \d+ dummy tokens \(new size: (\d+)\)")
_MLM_ITER = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_MLM_VALID = re.compile(r"\bvalidation loss at iteration (\d+)(?: on (\w+) set)? \|(.*)$")
MEGATRON_LM_LOGS = os.path.join("logs", "megatron_lm*.log")


def _mlm_value(text: str):
    text = text.strip()
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _mlm_fields(text: str) -> Dict[str, float]:
    """``| key: value | key: value |`` -> {key: number} (fields that are not numbers are left out)."""
    out = {}
    for part in text.split("|"):
        key, sep, value = part.rpartition(":")
        if sep:
            v = _mlm_value(value)
            if isinstance(v, (int, float)):
                out[key.strip()] = v
    return out


def parse_megatron_lm_log(text: str) -> Dict:
    """Megatron-LM's stdout -> ``{"args", "vocab_size", "padded_vocab_size", "metrics", "starts"}``.

    ``args``: the printed argument dump (the last one: a requeued job appends a new run to the same log);
    ``vocab_size``: the tokenizer's vocabulary from Megatron-LM's "padded vocab (size: V ...)" line (the
    unpadded size), ``padded_vocab_size`` the padded one; ``metrics``: one row per logged iteration, as the
    trainer's metrics.jsonl: ``step``, ``tokens`` (consumed samples x sequence length), ``loss`` (``lm loss``,
    the mean over the log interval), ``lr``, ``grad_norm``, and ``valid_loss`` at the evaluated iterations
    (the evaluation during training; the final "on validation set" one where there is none; the test set is
    left out). An iteration logged again by a later run (a resumed job re-running steps past its checkpoint)
    takes the later values. ``starts``: how many runs the log holds."""
    args: Dict = {}
    current: Optional[Dict] = None
    vocab = padded = None
    rows: Dict[int, Dict] = {}
    valid: Dict[int, float] = {}
    final_valid: Dict[int, float] = {}
    starts = 0
    for line in text.splitlines():
        if current is not None:
            if _MLM_ARGS_END.search(line):
                args, current = current, None
                continue
            m = _MLM_ARG.match(line)
            if m:
                current[m.group(1)] = _mlm_value(m.group(2))
            continue
        if _MLM_ARGS_START.search(line):
            current = {}
            starts += 1
            continue
        m = _MLM_ITER.search(line)
        if m and "validation loss" not in line:
            fields = _mlm_fields(m.group(3))
            if "lm loss" not in fields:
                continue
            it = int(m.group(1))
            row = {"step": it, "loss": float(fields["lm loss"])}
            seq = args.get("seq_length")
            samples = fields.get("consumed samples")
            if samples is None and isinstance(args.get("global_batch_size"), int):
                samples = it * args["global_batch_size"]
            if samples is not None and isinstance(seq, int):
                row["tokens"] = int(samples) * seq
            for key, name in (("learning rate", "lr"), ("grad norm", "grad_norm")):
                if key in fields:
                    row[name] = float(fields[key])
            rows[it] = row
            valid.pop(it, None)
            continue
        m = _MLM_VALID.search(line)
        if m:
            loss = _mlm_fields(m.group(3)).get("lm loss value")
            if loss is not None and m.group(2) in (None, "validation"):
                (valid if m.group(2) is None else final_valid)[int(m.group(1))] = float(loss)
            continue
        m = _MLM_VOCAB.search(line)
        if m:
            vocab, padded = int(m.group(1)), int(m.group(2))
    for it, loss in {**final_valid, **valid}.items():
        if it in rows:
            rows[it]["valid_loss"] = loss
    return {"args": args, "vocab_size": vocab, "padded_vocab_size": padded,
            "metrics": [rows[i] for i in sorted(rows)], "starts": starts}


def _megatron_lm_run(dirpath: str, logs: List[str]) -> Tuple[Dict, List[Dict]]:
    """What varies and the metrics of a Megatron-LM run dir, from its nodes' logs (the argument dump is
    printed by rank 0, the iteration lines by the last rank: they can be in different files)."""
    args: Dict = {}
    vocab = None
    rows: Dict[int, Dict] = {}
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as f:
            parsed = parse_megatron_lm_log(f.read())
        args = args or parsed["args"]
        vocab = vocab or parsed["vocab_size"]
        rows.update({r["step"]: r for r in parsed["metrics"]})
    if not args:
        raise ValueError(f"{dirpath}: no Megatron-LM argument dump in {', '.join(logs)}")
    params = {"kind": "megatron-lm", "vocab_size": vocab or args.get("vocab_size"),
              "hidden_size": args["hidden_size"], "head_rank": args.get("lm_head_rank") or None,
              "lr": args.get("lr"), "rank_sweep": True}
    for key in ("seq_length", "global_batch_size", "train_iters", "num_layers"):
        params[key] = args.get(key)
    return params, [rows[i] for i in sorted(rows)]


def load_runs(root: str) -> List[Run]:
    """Every run under ``root``, sorted by name; the kind is detected per directory (``params["kind"]``): a
    run.json (the sweep and demo write one: "sweep"), or else a trainer's ``logs/config.yaml`` ("trainer"),
    or else Megatron-LM's logs ``logs/megatron_lm*.log`` ("megatron-lm")."""
    runs = []
    for dirpath, _dirs, files in os.walk(root):
        config = os.path.join(dirpath, "logs", "config.yaml")
        metrics = None
        if "run.json" in files:
            with open(os.path.join(dirpath, "run.json"), encoding="utf-8") as f:
                params = json.load(f)
            params.setdefault("kind", "sweep")
        elif os.path.exists(config):
            params = dict(_params_from_config(config), kind="trainer")
        else:
            logs = sorted(glob.glob(os.path.join(glob.escape(dirpath), MEGATRON_LM_LOGS)))
            if not logs:
                continue
            params, metrics = _megatron_lm_run(dirpath, logs)
        run = Run(os.path.relpath(dirpath, root), dirpath, params)
        for attr, fname in (("metrics", "metrics.jsonl"), ("probe", "probe.jsonl")):
            path = os.path.join(dirpath, "logs", fname)
            if os.path.exists(path):
                setattr(run, attr, read_jsonl(path))
        if metrics is not None:
            run.metrics = metrics
        runs.append(run)
    return sorted(runs, key=_run_order)


def _run_order(run: "Run"):
    """Runs sorted numerically by V, then head rank (dense last), learning rate and name."""
    p = run.params
    try:
        v = int(p.get("vocab_size"))
    except (TypeError, ValueError):
        v = 0
    r = p.get("head_rank")
    return (v, float("inf") if r is None else float(r), float(p.get("lr") or 0), run.name)


EVAL_RESULTS = os.path.join("eval", "results.json")
PPL_SUFFIX = " (word ppl)"


def eval_scores(run: Run) -> Dict[str, float]:
    """Task -> zero-shot score from ``<run>/eval/results.json`` (lm-eval's results dict, written by
    ``megatron-bottleneck eval``): ``acc_norm`` where the task has it (HellaSwag, ARC, PIQA), else ``acc``;
    a perplexity task gives its ``word_perplexity`` as ``"<task> (word ppl)"``. Empty without results."""
    path = os.path.join(run.path, EVAL_RESULTS)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        results = json.load(f).get("results") or {}
    out: Dict[str, float] = {}
    for task, metrics in sorted(results.items()):
        for key, label in (("acc_norm,none", task), ("acc,none", task), ("word_perplexity,none", task + PPL_SUFFIX)):
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[label] = float(v)
                break
    return out


def smoothed(points: List, window: int) -> List:
    """Centred moving average of ``(x, y)`` points over ``window`` points (fewer at the ends)."""
    half = max(0, window // 2)
    ys = [y for _, y in points]
    out = []
    for i, (x, _) in enumerate(points):
        part = ys[max(0, i - half): i + half + 1]
        out.append((x, sum(part) / len(part)))
    return out


def loss_curve(run: Run, points_per_window: int = 0) -> List:
    """The training loss at every logged step against tokens, smoothed over ~2% of the run (at least 1)."""
    pts = run.series("loss")
    window = points_per_window or max(1, len(pts) // 50) | 1
    return smoothed(pts, window)


def tokens_to_reach(curve: List, target: float):
    """``(tokens, censored)``: the first token count at which the curve is <= ``target`` (linear interpolation
    between logged points); ``censored`` when it is already there at the first point (the true figure is at
    most that). ``(None, False)`` if never reached."""
    for i, (t1, v1) in enumerate(curve):
        if v1 <= target:
            if i == 0:
                return float(t1), True
            t0, v0 = curve[i - 1]
            return (float(t1) if v0 == v1 else t0 + (t1 - t0) * (v0 - target) / (v0 - v1)), False
    return None, False


def value_at_tokens(run: Run, tokens: float, key: str = "valid_loss") -> Optional[float]:
    """``key`` at a token count (interpolated; None if the run never got that far)."""
    pts = run.series(key)
    prev = None
    for t, v in pts:
        if t >= tokens:
            if prev is None or t == prev[0]:
                return v
            return prev[1] + (v - prev[1]) * (tokens - prev[0]) / (t - prev[0])
        prev = (t, v)
    return None


def best_lr_runs(runs: List[Run], group_key) -> Dict:
    """For each group (e.g. vocabulary size) the run with the lowest final valid loss over LRs."""
    best: Dict = {}
    for run in runs:
        key = group_key(run)
        loss = run.final("valid_loss")
        if loss is None:
            continue
        if key not in best or loss < best[key].final("valid_loss"):
            best[key] = run
    return dict(sorted(best.items()))


def _plot_curves(path: str, title: str, curves: Dict[str, List], ylabel: str, logx: bool = False) -> Optional[str]:
    return plot_series(path, title, curves, "tokens", ylabel, 10 if logx else None)


def _plot_xy(path, title, series: Dict[str, List], xlabel, ylabel) -> Optional[str]:
    return plot_series(path, title, {k: sorted(v) for k, v in series.items()}, xlabel, ylabel, 2)


def _image(png: Optional[str]) -> List[str]:
    """Markdown lines of a plot (nothing where matplotlib is missing)."""
    return [f"![]({png})", ""] if png else ["(plot not drawn: pip install matplotlib)", ""]


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"
    return str(v)


def write_report(root: str, out_dir: Optional[str] = None, title: str = "Gradient bottleneck report") -> str:
    """Write ``report.md`` and PNG plots for the runs under ``root``; returns the markdown path."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no runs (directories with run.json, logs/config.yaml or {MEGATRON_LM_LOGS}) "
                                f"under {root!r}")
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    kinds: Dict[str, int] = {}
    for r in runs:
        kind = r.params.get("kind", "sweep")
        kinds[kind] = kinds.get(kind, 0) + 1
    names = {"sweep": "sweep", "trainer": "megatron-bottleneck trainer", "megatron-lm": "Megatron-LM"}
    kind_text = ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(kinds.items()))
    lines = [f"# {title}", "", f"{len(runs)} runs under `{root}` ({kind_text}). Every figure below is read from "
             "the run logs.", ""]

    # Per-run table.
    lines += ["## Runs", "",
              "| run | V | D | head rank | lr | tokens | final train loss | final valid loss | "
              "destroyed ratio | visible cosine | isotropic baseline | draws per symbol min / median |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cov = r.params.get("coverage") or {}
        lines.append(
            f"| {r.name} | {r.vocab} | {r.hidden} | {r.params.get('head_rank') or 'dense'} | "
            f"{_fmt(r.params.get('lr'), 4)} | {_fmt(r.final('tokens'), 0)} | {_fmt(r.final('loss', last=5))} | "
            f"{_fmt(r.final('valid_loss'))} | {_fmt(r.mean_probe('destroyed_ratio'), 4)} | "
            f"{_fmt(r.mean_probe('visible_cosine'), 4)} | {_fmt(r.mean_probe('isotropic_baseline'), 4)} | "
            f"{cov.get('min', '-')} / {cov.get('median', '-')} |"
        )
    lines.append("")

    dense = [r for r in runs if r.params.get("head_rank") is None]
    # Vocabulary sweep: best LR per vocabulary, curves and the LR table.
    by_vocab = best_lr_runs(dense, lambda r: r.vocab)
    if by_vocab:
        png = _plot_curves(os.path.join(out_dir, "loss_by_vocab.png"), "Validation loss by vocabulary (best LR)",
                           {f"V={v} (V/D={v / r.hidden:g}, lr={r.params.get('lr')})": r.series("valid_loss")
                            for v, r in by_vocab.items()}, "valid loss")
        lines += ["## Vocabulary sweep (dense head, best learning rate per V)", "", *_image(png),
                  "| V | V/D | best lr | final valid loss | all LRs: final valid loss |", "|---|---|---|---|---|"]
        for v, best in by_vocab.items():
            per_lr = ", ".join(f"{_fmt(r.params.get('lr'), 4)}: {_fmt(r.final('valid_loss'))}"
                               for r in sorted(dense, key=lambda r: r.params.get("lr") or 0) if r.vocab == v)
            lines.append(f"| {v} | {v / best.hidden:g} | {best.params.get('lr')} | "
                         f"{_fmt(best.final('valid_loss'))} | {per_lr} |")
        lines.append("")
        # Equal per-symbol coverage: loss when each symbol has been drawn about c times on average.
        cov_target = min((r.params.get("tokens_per_symbol_total") or 0) for r in by_vocab.values())
        if cov_target:
            c = cov_target / 4
            lines += [f"### At equal per-symbol coverage ({c:g} tokens per symbol on average)", "",
                      "| V | tokens | valid loss |", "|---|---|---|"]
            for v, r in by_vocab.items():
                t = c * v
                lines.append(f"| {v} | {t:.0f} | {_fmt(value_at_tokens(r, t))} |")
            lines.append("")

    # Destroyed ratio vs V/D and vs head rank.
    dr_vd = [(r.vocab / r.hidden, r.mean_probe("destroyed_ratio")) for r in by_vocab.values()]
    base_vd = [(r.vocab / r.hidden, r.mean_probe("isotropic_baseline")) for r in by_vocab.values()]
    ranked = [r for r in runs if r.params.get("rank_sweep")]
    dr_rank = [(r.rank, r.mean_probe("destroyed_ratio")) for r in ranked]
    base_rank = [(r.rank, r.mean_probe("isotropic_baseline")) for r in ranked]
    if any(v is not None for _, v in dr_vd + dr_rank):
        lines += ["## Destroyed ratio", ""]
        if any(v is not None for _, v in dr_vd):
            png = _plot_xy(os.path.join(out_dir, "destroyed_vs_vd.png"), "Destroyed ratio vs V/D",
                           {"measured": dr_vd, "isotropic baseline": base_vd}, "V/D", "destroyed ratio")
            lines += [*_image(png)]
        if any(v is not None for _, v in dr_rank):
            png = _plot_xy(os.path.join(out_dir, "destroyed_vs_rank.png"), "Destroyed ratio vs head rank",
                           {"measured": dr_rank, "isotropic baseline": base_rank}, "head rank r",
                           "destroyed ratio")
            lines += [*_image(png)]

    # Rank sweep: loss curves and tokens-to-reach-a-loss.
    if ranked:
        png = _plot_curves(os.path.join(out_dir, "loss_by_rank.png"),
                           f"Validation loss by head rank (V={ranked[0].vocab})",
                           {f"r={r.rank}": r.series("valid_loss") for r in sorted(ranked, key=lambda r: r.rank)},
                           "valid loss")
        lines += ["## Head-rank sweep", "", *_image(png)]
        curves = {r.name: loss_curve(r) for r in ranked}
        finals = {r.name: curves[r.name][-1][1] for r in ranked if curves[r.name]}
        worst = max((r for r in ranked if r.name in finals), key=lambda r: finals[r.name], default=None)
        full = max(ranked, key=lambda r: r.rank)
        if worst is not None:
            target = finals[worst.name]
            t_full, full_censored = tokens_to_reach(curves[full.name], target)
            lines += [f"Tokens to reach the training loss {_fmt(target)} (the final loss of r={worst.rank}), on the "
                      "training loss of every step smoothed over ~2% of the run. A ratio marked >= is censored: the "
                      f"r={full.rank} run was already below the target at its first logged step.", "",
                      "| head rank | tokens to reach | ratio vs r=" + str(full.rank) + " |", "|---|---|---|"]
            for r in sorted(ranked, key=lambda r: r.rank):
                t, censored = tokens_to_reach(curves[r.name], target)
                if t is None or not t_full:
                    ratio = "-"
                else:
                    bound = ">= " if full_censored and not (censored and r is full) else ""
                    ratio = f"{bound}{_fmt(t / t_full, 2)}x"
                lines.append(f"| {r.rank} | {'<= ' if censored else ''}{_fmt(t, 0)} | {ratio} |")
            lines.append("")

    # Rank of the logit gradient vs batch tokens: one line per V (its best-LR dense run, else its first run).
    with_curve = [r for r in runs if any("probe/rank_curve" in p for p in r.probe)]
    per_vocab: Dict[int, Run] = {}
    for r in with_curve:
        best = by_vocab.get(r.vocab)
        if r.vocab not in per_vocab or r is best:
            per_vocab[r.vocab] = r
    if per_vocab:
        series = [RankSeries(f"V={v} ({r.name})", v, [p for p in r.probe if "probe/rank_curve" in p][-1]
                             ["probe/rank_curve"]) for v, r in sorted(per_vocab.items())]
        spamlang = any(r.params.get("kind", "sweep") == "sweep" for r in per_vocab.values())
        note = ("SpamLang: the rank saturates at the number of distinct sequences in the batch" if spamlang
                else None)
        png = plot_rank_curves(series, os.path.join(out_dir, "rank_vs_tokens.png"), note=note)
        lines += ["## Rank of the logit gradient", "", *_image(png),
                  "One line per vocabulary size (the best-LR dense run where there is one), from the last rank "
                  "analysis of the run; dotted: the ceiling min(T, V - 1)."
                  + (" On SpamLang the rank saturates at the number of distinct sequences in the batch, well "
                     "below the ceiling: a property of the data, not of the head." if spamlang else ""), ""]

    # Zero-shot scores (``megatron-bottleneck eval`` writes <run>/eval/results.json) against head rank.
    scored = sorted(((r, eval_scores(r)) for r in runs), key=lambda rs: rs[0].rank)
    scored = [(r, s) for r, s in scored if s]
    if scored:
        tasks = sorted({t for _, s in scored for t in s})
        acc_tasks = [t for t in tasks if not t.endswith(PPL_SUFFIX)]
        lines += ["## Zero-shot score vs head rank", "",
                  "lm-evaluation-harness scores of each run's checkpoint (`megatron-bottleneck eval`): acc_norm "
                  "where the task has it, else acc; the average is over the accuracy tasks every run has.", "",
                  "| run | head rank | " + " | ".join(tasks) + " | average |", "|---|---|" + "---|" * (len(tasks) + 1)]
        common = [t for t in acc_tasks if all(t in s for _, s in scored)]
        series: Dict[str, List] = {t: [] for t in acc_tasks}
        series["average"] = []
        for r, sc in scored:
            avg = sum(sc[t] for t in common) / len(common) if common else None
            dense = " (dense)" if r.params.get("head_rank") is None else ""
            lines.append(f"| {r.name} | {r.rank}{dense} | " + " | ".join(_fmt(sc.get(t)) for t in tasks) + f" | {_fmt(avg)} |")
            for t in acc_tasks:
                series[t].append((r.rank, sc.get(t)))
            series["average"].append((r.rank, avg))
        lines.append("")
        if len({r.rank for r, _ in scored}) > 1 and acc_tasks:
            png = plot_series(os.path.join(out_dir, "zero_shot_vs_rank.png"), "Zero-shot score vs head rank",
                              {k: sorted(v) for k, v in series.items()}, "head rank r", "score", xlog_base=2,
                              ylog=False)
            if png:
                lines += [f"![]({png})", ""]

    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
