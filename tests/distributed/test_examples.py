"""The runnable examples README points to run as written (real processes, 2 CPU ranks each)."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(script, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "examples" / script)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_probe_forward_step_example_prints_a_record_per_step(tmp_path):
    lines = [l for l in _run("probe_forward_step.py", tmp_path).splitlines() if l.startswith("step ")]
    assert [l.split(":")[0] for l in lines] == ["step 0", "step 1", "step 2"]
    assert (tmp_path / "runs" / "probe_example" / "probe.jsonl").read_text().count("\n") == 3


def test_tp2_low_rank_head_example_runs(tmp_path):
    out = _run("tp2_low_rank_head.py", tmp_path)
    assert "LowRankOutputLayer(" in out and "rank=64, TP=2" in out
