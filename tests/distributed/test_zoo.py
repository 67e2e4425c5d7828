"""The zoo command's tiny CPU version through the command line (a subprocess, as a user runs it): its report
(Markdown, JSON, PNGs) holds the runs' own logged figures, the probe's refusal of a non-linear head is "n/a"
with its reason, and a rerun skips every finished run."""
import json
import math
import os
import subprocess
import sys

import pytest

from megatron_bottleneck.base.sinks import read_jsonl
from megatron_bottleneck.cli import main
from megatron_bottleneck.report import loss_curve, load_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("matplotlib")
pytest.importorskip("sentencepiece")
HEADS = "dense,sigsoftmax"  # a head the probe measures and one it refuses (2 x 2 runs: cheap)


def _zoo(out):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megatron_bottleneck.cli", "zoo", "examples/zoo_tiny.yaml",
                           "--out", str(out), "--heads", HEADS, f"zoo.text_files=[{os.path.join(ROOT, 'docs', 'heads.md')}]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "out"
    proc = _zoo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_zoo_report_holds_the_runs_own_figures(zoo):
    out, proc = zoo
    summary = json.loads((out / "zoo.json").read_text())
    assert [s["setting"] for s in summary["settings"]] == ["spamlang_V32", "text_V128"]
    runs = {r.name: r for r in load_runs(str(out))}
    report = (out / "zoo_report.md").read_text()
    for s in summary["settings"]:
        assert [h["head"] for h in s["heads"]] == ["dense", "sigsoftmax"]
        finals = {}
        for h in s["heads"]:
            logs = os.path.join(out, h["run"], "logs")
            metrics = read_jsonl(os.path.join(logs, "metrics.jsonl"))
            assert [m["step"] for m in metrics] == [1, 2, 3, 4]
            assert h["final_valid_loss"] == [m["valid_loss"] for m in metrics if "valid_loss" in m][-1]
            assert f"{h['final_valid_loss']:.3f}" in report
            assert h["params"] == h["params_counted"]  # analytic count = the built head's parameters
            assert h["time_ms"] > 0 and h["saved_bytes"] > 0
            finals[h["head"]] = loss_curve(runs[h["run"]])[-1][1]
            # every head probed: dense by the closed form, sigsoftmax (non-linear) by the general path
            assert h["probe"] == "on", h.get("probe_reason")
            probe = read_jsonl(os.path.join(logs, "probe.jsonl"))
            dr = [p["probe/destroyed_ratio"] for p in probe]
            uc = [p["probe/update_cosine"] for p in probe]
            assert len(dr) == 4 and all(0 <= v <= 1 for v in dr)
            assert math.isclose(h["destroyed_ratio"]["mean"], sum(dr) / len(dr), rel_tol=1e-12)
            assert (h["destroyed_ratio"]["first"], h["destroyed_ratio"]["last"]) == (dr[0], dr[-1])
            assert math.isclose(h["update_cosine"]["mean"], sum(uc) / len(uc), rel_tol=1e-12)
            if h["head"] == "sigsoftmax":
                assert all("probe/cg_residual" in p for p in probe)
        # the common loss is the worst head's final smoothed loss: that head reaches it, at its last point or before
        assert s["target_loss"] == max(finals.values())
        worst = next(h for h in s["heads"] if finals[h["head"]] == s["target_loss"])
        assert worst["tokens_to_target"] is not None and worst["tokens_to_target"] <= worst["tokens"]
    for png in ("zoo_valid_spamlang_V32.png", "zoo_valid_text_V128.png", "zoo_destroyed_spamlang_V32.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    assert "## Heads the probe does not measure" not in report
    log = (out / "zoo.log").read_text().splitlines()  # one progress line per finished run
    assert len(log) == 4 and all("finished" in line for line in log)
    assert len((out / "runs.txt").read_text().split()) == 4


def test_zoo_rerun_skips_finished_runs(zoo, capsys, monkeypatch):
    out, _ = zoo
    metrics = sorted(out.glob("runs/*/*/logs/metrics.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in metrics}
    (out / "zoo_report.md").unlink()
    monkeypatch.chdir(ROOT)  # the same command, in this process (nothing left to train: no process starts)
    assert main(["zoo", "examples/zoo_tiny.yaml", "--out", str(out), "--heads", HEADS,
                 f"zoo.text_files=[{os.path.join(ROOT, 'docs', 'heads.md')}]"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("skip (done): ") == 4 and "measuring" not in stdout and "runs to do" not in stdout
    assert {p: p.stat().st_mtime_ns for p in metrics} == before
    assert "report:" in stdout and (out / "zoo_report.md").exists()
