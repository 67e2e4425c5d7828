"""The rank-sweep report: tokens-to-reach-loss on per-step curves, censored ratios marked, from logs."""
import json
import math
import os

import pytest

from megatron_bottleneck.report import load_runs, smoothed, tokens_to_reach, write_report

pytest.importorskip("matplotlib")


def _run(root, name, rank, losses, tokens_per_step=1000):
    d = os.path.join(root, "runs", name)
    os.makedirs(os.path.join(d, "logs"))
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"vocab_size": 256, "hidden_size": 16, "head_rank": rank, "lr": 0.01, "rank_sweep": True}, f)
    with open(os.path.join(d, "logs", "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "tokens": i * tokens_per_step, "loss": loss}) + "\n")


def test_tokens_to_reach_interpolates_and_flags_censoring():
    curve = [(1000, 5.0), (2000, 3.0), (3000, 1.0)]
    assert tokens_to_reach(curve, 4.0) == (1500.0, False) and tokens_to_reach(curve, 2.0) == (2500.0, False)
    assert tokens_to_reach(curve, 6.0) == (1000.0, True)  # already below at the first point
    assert tokens_to_reach(curve, 0.5) == (None, False)
    assert smoothed([(1, 1.0), (2, 3.0), (3, 5.0)], 3) == [(1, 2.0), (2, 3.0), (3, 4.0)]


def test_report_marks_a_censored_ratio(tmp_path):
    steps = 200
    _run(tmp_path, "r2", 2, [4.0 - 1.0 * i / steps for i in range(steps)])            # ends near 3.0
    _run(tmp_path, "r8", 8, [3.0 * math.exp(-i / 20) + 0.5 for i in range(steps)])     # crosses 3.0 after ~10 steps
    _run(tmp_path, "dense", None, [2.0 * math.exp(-i / 10) for i in range(steps)])     # below 3.0 from the start
    text = open(write_report(str(tmp_path))).read()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "x |" in line}
    assert ">= " in rows["2"] and ">= " in rows["8"]  # the dense run is censored: every ratio is a lower bound
    assert rows["16"].split("|")[2].strip().startswith("<= ")
    runs = {r.name: r for r in load_runs(str(tmp_path))}
    assert len(runs["runs/r2"].series("loss")) == steps  # every logged step is used
