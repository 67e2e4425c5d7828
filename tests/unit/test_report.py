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


def _vocab_run(root, name, vocab, lr, curve_tokens, valid):
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "logs"))
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"vocab_size": vocab, "hidden_size": 16, "head_rank": None, "lr": lr}, f)
    with open(os.path.join(d, "logs", "metrics.jsonl"), "w") as f:
        for i, v in enumerate(valid, 1):
            f.write(json.dumps({"step": i, "tokens": i * 100, "loss": v, "valid_loss": v}) + "\n")
    curve = [{"tokens": t, "numerical_rank": min(t, vocab - 1, 40)} for t in curve_tokens]
    with open(os.path.join(d, "logs", "probe.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "tokens": 100, "probe/destroyed_ratio": 0.9, "probe/rank_curve": curve}) + "\n")


def test_report_orders_runs_by_vocabulary_and_draws_one_rank_line_per_vocabulary(tmp_path):
    ts = [1, 2, 4, 8, 16, 32, 64, 128]
    for vocab in (1024, 128, 256):  # names sort as strings 1024 < 128 < 256; the report sorts them as numbers
        for lr in (0.01, 0.03):
            _vocab_run(tmp_path, f"V{vocab}_lr{lr}", vocab, lr, ts, [1.0 / (lr * 100), 0.5 / (lr * 100)])
    assert [r.vocab for r in load_runs(str(tmp_path))] == [128, 128, 256, 256, 1024, 1024]
    text = open(write_report(str(tmp_path))).read()
    table = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| V") and "_lr" in line]
    assert table == ["V128_lr0.01", "V128_lr0.03", "V256_lr0.01", "V256_lr0.03", "V1024_lr0.01", "V1024_lr0.03"]
    assert os.path.exists(tmp_path / "rank_vs_tokens.png")
    section = text.split("## Rank of the logit gradient")[1]
    assert "One line per vocabulary size" in section and "distinct sequences" in section


def test_log_scale_where_values_span_orders_of_magnitude(tmp_path):
    from megatron_bottleneck.plots import RankSeries, plot_rank_curves, plot_series, wants_log_scale

    assert wants_log_scale([1e-7, 6e-3]) and not wants_log_scale([1.0, 3.0]) and not wants_log_scale([0.0, 5.0])
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen[os.path.basename(args[0])] = (ax.get_yscale(), {ln.get_label(): ln.get_xydata().tolist()
                                                             for ln in ax.get_lines()})
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot_series(str(tmp_path / "loss.png"), "loss", {"r=2": [(1, 6e-3), (2, 1e-3)], "r=64": [(1, 1e-5), (2, 1e-7)]},
                    "tokens", "loss")
        plot_rank_curves([RankSeries("big", 1000, [{"tokens": t, "numerical_rank": t} for t in (1, 10, 100)]),
                          RankSeries("small", 50, [{"tokens": t, "numerical_rank": min(t, 49)} for t in (1, 10, 100)])],
                         str(tmp_path / "rank.png"))
    finally:
        plt.Figure.savefig = real_savefig
    assert seen["loss.png"][0] == "log"
    scale, lines = seen["rank.png"]
    assert list(lines)[:2] == ["small", "big"]  # sorted numerically by V
    ceiling = dict(map(tuple, lines["min(T, V-1), V=50"]))
    assert ceiling[100] == 49 and ceiling[16] == 16 and scale == "log"
