"""launch/zoo.sbatch on the real two-node Slurm (tests/slurm/cluster.py): the tiny zoo prepared with
``--prepare-only``, its runs trained as a job array (one CPU rank each, through train.sbatch), then the zoo
command again: it finds every run finished, trains nothing and writes the report from the array's logs."""
import json
import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZOO = os.path.join(REPO, "launch", "zoo.sbatch")
TINY = os.path.join(REPO, "examples", "zoo_tiny.yaml")
HEADS = "dense,sigsoftmax"


def _zoo(out, *extra):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "megatron_bottleneck.cli", "zoo", TINY, "--heads", HEADS,
                           "--out", out, "zoo.text_files=[]", *extra], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def _read(path):
    with open(path) as f:
        return f.read()


def test_zoo_array_trains_each_run_and_the_rerun_reports_them(slurm_cluster, tmp_path):
    c = slurm_cluster
    out = str(tmp_path / "zoo")
    p = _zoo(out, "--prepare-only")
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [line for line in _read(os.path.join(out, "runs.txt")).splitlines() if line.strip()]
    assert runs == ["runs/spamlang_V32/dense", "runs/spamlang_V32/sigsoftmax"]
    assert not any(os.path.exists(os.path.join(out, r, "logs", "metrics.jsonl")) for r in runs)  # nothing trained

    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHON": sys.executable,
           "MB_CPU": "1", "NPROC_PER_NODE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "ZOO_DIR": out}
    log = str(tmp_path / "zoo-%A_%a.out")
    job = c.sbatch(["-o", log, "--gpus-per-node=0", f"--array=0-{len(runs) - 1}", ZOO], env=env, cwd=str(tmp_path))
    states = c.wait([f"{job}_{i}" for i in range(len(runs))], timeout=400)
    logs = {i: _read(str(tmp_path / f"zoo-{job}_{i}.out")) for i in range(len(runs))}
    for i, run in enumerate(runs):
        assert states[f"{job}_{i}"] == "COMPLETED", logs[i][-3000:]
        assert f"zoo run {run} ->" in logs[i]
        metrics = [json.loads(x) for x in _read(os.path.join(out, run, "logs", "metrics.jsonl")).splitlines() if x]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        with open(os.path.join(out, run, "logs", "config.yaml")) as f:
            assert yaml.safe_load(f)["model"]["head_type"] == run.split("/")[-1]
    stamps = {r: os.stat(os.path.join(out, r, "logs", "metrics.jsonl")).st_mtime_ns for r in runs}

    p = _zoo(out)  # the report: every run is done, nothing trains again
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(os.path.exists(os.path.join(out, r, "DONE")) for r in runs)  # found finished, marked DONE
    assert stamps == {r: os.stat(os.path.join(out, r, "logs", "metrics.jsonl")).st_mtime_ns for r in runs}
    assert not os.path.exists(os.path.join(out, "zoo.log"))  # no run trained by the zoo command itself
    summary = json.load(open(os.path.join(out, "zoo.json")))
    (setting,) = summary["settings"]
    for h in setting["heads"]:
        metrics = [json.loads(x) for x in _read(os.path.join(out, h["run"], "logs", "metrics.jsonl")).splitlines()
                   if x]
        assert h["final_valid_loss"] == [m["valid_loss"] for m in metrics if "valid_loss" in m][-1]
    assert [h["head"] for h in setting["heads"]] == ["dense", "sigsoftmax"]
    assert os.path.exists(os.path.join(out, "zoo_report.md"))
