"""Megatron-LM's unchanged pretrain_gpt.py on a real two-node Slurm cluster through launch/megatron_lm*.sbatch.

Runs the Megatron-LM snapshot matching the installed megatron-core (``../shared/megatron-lm/core_v0.16.1``
for 0.16, ``core_v0.19.0`` for 0.19; skipped with the reason when absent) at a tiny width
(examples/megatron_lm_tiny.args), CPU ranks with gloo. One module fixture submits everything at once
(about 90 s on 2 idle cores, 100 s with core_v0.19.0):
  S  launch/megatron_lm_rank_sweep.sbatch as a job array over head ranks 4 and dense, 80 iterations each;
     task 0 (rank 4) is sent USR1 (``scancel --signal=USR1 --batch``) after its first iteration: Megatron-LM
     saves (--exit-signal-handler), the task requeues itself, the rerun resumes from the checkpoint;
  D  launch/megatron_lm.sbatch --dry-run on two nodes (head rank 8, MLM_EXIT_SIGNAL=USR1);
  G  launch/megatron_lm.sbatch without MB_CPU=1 on these GPU-less nodes: one error line.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from ..distributed.test_megatron_lm import DEPS
from ..distributed.test_megatron_lm import _mlm_dir as mlm_snapshot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE = os.path.join(REPO, "launch", "megatron_lm.sbatch")
SWEEP = os.path.join(REPO, "launch", "megatron_lm_rank_sweep.sbatch")
TINY = os.path.join(REPO, "examples", "megatron_lm_tiny.args")
ITERS = 80  # enough iterations after the first for USR1 to arrive mid-run on a loaded machine


def _mlm_dir():
    """The Megatron-LM snapshot for this megatron-core (the zero-edit runner tests' lookup), and its deps."""
    path, why = mlm_snapshot()
    if path is None:
        return None, why
    missing = [d for d in DEPS if importlib.util.find_spec(d) is None]
    if missing:
        return None, f"Megatron-LM's training code needs {', '.join(missing)}"
    return path, ""


MLM, _why = _mlm_dir()


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _probe_steps(run):
    with open(os.path.join(run, "logs", "probe.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    if MLM is None:
        pytest.skip(_why)
    c = slurm_cluster
    tmp = str(tmp_path_factory.mktemp("slurm_mlm"))
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHON": sys.executable,
           "MB_CPU": "1", "MEGATRON_LM": MLM, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "TRAIN_ITERS": str(ITERS), "EVAL_INTERVAL": "20"}
    out = {"tmp": tmp}

    def submit(name, script, args, extra=(), **more_env):
        o = os.path.join(tmp, f"{name}-%a.out" if "--array" in " ".join(extra) else f"{name}.out")
        job = c.sbatch(["-o", o, "-J", f"mb-mlm-{name}", "--gpus-per-node=0", *extra, script, *args],
                       env={**env, **more_env}, cwd=tmp)
        out[name] = {"job": job, "out": o}
        return job

    t0 = time.time()
    sweep = submit("sweep", SWEEP, [TINY], ["--array=0-1"], RANKS="4 dense", RUNS_ROOT=os.path.join(tmp, "runs"),
                   SWEEP_NAME="sw")
    dry = submit("dry", ONE, [TINY, "--micro-batch-size", "1", "--dry-run"], ["-N", "2"], NPROC_PER_NODE="2",
                 RUN_DIR=os.path.join(tmp, "dry"), LM_HEAD_RANK="8", MLM_EXIT_SIGNAL="USR1")
    gpu = submit("gpu", ONE, [TINY], ["-N", "1"], MB_CPU="0", RUN_DIR=os.path.join(tmp, "gpu"))
    r4 = os.path.join(tmp, "runs", "sw", "r4")
    log4 = os.path.join(r4, "logs", "megatron_lm.node0.log")
    task0 = f"{sweep}_0"

    # task 0: USR1 to its batch shell once Megatron-LM has logged an iteration
    deadline = time.time() + 360
    while not re.search(r"\biteration\s+1/", _read(log4)):
        assert time.time() < deadline, "task 0 logged no iteration in time:\n" + _read(out["sweep"]["out"])[-3000:]
        assert c.state(task0) in ("PENDING", "RUNNING", "CONFIGURING"), _read(log4)[-3000:]
        time.sleep(0.1)
    c.run(["scancel", "--signal=USR1", "--batch", task0])
    while not (c.job(task0).get("Restarts") == "1" and c.state(task0) == "PENDING"):
        assert time.time() < deadline, f"task 0 was not requeued: {c.job(task0)}\n" + _read(log4)[-3000:]
        time.sleep(0.2)
    out["task1_after_requeue"] = c.job(f"{sweep}_1")
    # a requeued job otherwise waits ~120 s; start it once the nodes have cleaned up its first run
    while "COMPLETING" in c.run(["scontrol", "show", "nodes"]).stdout or \
            "COMPLETING" in c.run(["squeue", "-h", "-t", "CG", "-o", "%T"]).stdout:
        assert time.time() < deadline, "the nodes did not finish cleaning up task 0's first run"
        time.sleep(0.2)
    time.sleep(3)
    c.run(["scontrol", "update", f"JobId={task0}", "StartTime=now"])
    out["states"] = c.wait([task0, f"{sweep}_1", dry, gpu], timeout=300)
    out["task0"] = c.job(task0)
    out["seconds"] = time.time() - t0
    print(f"Megatron-LM slurm jobs done in {out['seconds']:.0f} s")
    return out


def test_megatron_lm_rank_sweep_array_and_report(jobs):
    """The array runs Megatron-LM once per head rank in runs/sw/r<rank>, each with its checkpoint, logs and
    probe.jsonl; the report holds both runs; --dry-run prints the commands; no GPU without MB_CPU: one line."""
    from megatron_bottleneck.report import load_runs, write_report

    sweep, root = jobs["sweep"]["job"], os.path.join(jobs["tmp"], "runs", "sw")
    assert sorted(os.listdir(root)) == ["r4", "rdense"]
    for task, rank in ((0, "4"), (1, "dense")):
        task_out = jobs["sweep"]["out"].replace("%a", str(task))
        assert jobs["states"][f"{sweep}_{task}"] == "COMPLETED", _read(task_out)[-3000:]
        run = os.path.join(root, f"r{rank}")
        assert _read(os.path.join(run, "checkpoints", "latest_checkpointed_iteration.txt")).strip() == str(ITERS)
        assert sorted(set(_probe_steps(run))) == list(range(ITERS))
        text = _read(os.path.join(run, "logs", "megatron_lm.node0.log"))
        assert ("installed a rank-4 low-rank LM head" in text) == (rank == "4")
    runs = {r.name: r for r in load_runs(root)}
    assert {n: (r.params["kind"], r.params["head_rank"]) for n, r in runs.items()} == \
        {"r4": ("megatron-lm", 4), "rdense": ("megatron-lm", None)}
    for r in runs.values():
        assert [m["step"] for m in r.metrics] == list(range(1, ITERS + 1))
        assert [m["step"] for m in r.metrics if "valid_loss" in m] == list(range(20, ITERS + 1, 20))
    report = _read(write_report(root))
    assert "2 runs under" in report and "(2 Megatron-LM)" in report
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| r")}
    assert rows["r4"][4].strip() == "4" and rows["rdense"][4].strip() == "dense"
    assert "## Head-rank sweep" in report and "Rank of the logit gradient" in report

    dry, text = os.path.join(jobs["tmp"], "dry"), _read(jobs["dry"]["out"])
    assert jobs["states"][jobs["dry"]["job"]] == "COMPLETED" and "dry run: would run" in text
    assert f"mkdir -p {dry}/logs {dry}/.launch\n" in text
    line = next(x for x in text.splitlines() if x.startswith("srun "))
    assert line.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec > >(")
    assert f"tee -a {dry}/logs/megatron_lm.node$SLURM_NODEID.log) 2>&1; echo $$ > {dry}/.launch/torchrun." in line
    assert (f"{sys.executable} -m torch.distributed.run --nnodes 2 --node-rank $SLURM_NODEID --nproc-per-node 2 "
            "--master-addr n1 --master-port ") in line
    assert (f"-m megatron_bottleneck.megatron_lm {MLM}/pretrain_gpt.py --save {dry}/checkpoints --load "
            f"{dry}/checkpoints --tensorboard-dir {dry}/tensorboard --probe-log-dir {dry}/logs --exit-signal-handler "
            "--exit-signal SIGUSR1 --num-layers 2 ") in line
    assert line.endswith("--lm-head-rank 8 --micro-batch-size 1'")  # the args file, the head, then yours
    assert not os.path.exists(dry)

    assert jobs["states"][jobs["gpu"]["job"]] == "FAILED"
    err = [x for x in _read(jobs["gpu"]["out"]).splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: no GPU visible on n1") and "MB_CPU=1" in err[0]
    assert not os.path.exists(os.path.join(jobs["tmp"], "gpu"))


def test_megatron_lm_usr1_saves_requeues_only_its_task_and_resumes(jobs):
    """USR1 -> SIGTERM to torchrun -> Megatron-LM saves at the end of its iteration and exits -> the array task
    (not the whole array) requeues itself -> the rerun loads that checkpoint: every iteration logged once."""
    from megatron_bottleneck.report import parse_megatron_lm_log

    sweep = jobs["sweep"]["job"]
    run = os.path.join(jobs["tmp"], "runs", "sw", "r4")
    out, log = _read(jobs["sweep"]["out"].replace("%a", "0")), _read(os.path.join(run, "logs", "megatron_lm.node0.log"))
    assert "USR1: sending SIGTERM to the torchrun agents" in out and f"requeueing job {sweep}_0" in out
    assert "(restart 1)" in out and jobs["task0"]["Restarts"] == "1"
    saved = int(re.search(r"saving checkpoint at iteration\s+(\d+) to ", log).group(1))
    assert 1 <= saved < ITERS and "exiting program after receiving SIGTERM" in log
    assert f"loading checkpoint from {run}/checkpoints at iteration {saved}" in log
    parsed = parse_megatron_lm_log(log)
    assert parsed["starts"] == 2 and [m["step"] for m in parsed["metrics"]] == list(range(1, ITERS + 1))
    first, second = log.split("end of arguments")[1], log.split("end of arguments")[2]
    assert [int(i) for i in re.findall(r"\biteration\s+(\d+)/", first)] == list(range(1, saved + 1))
    assert [int(i) for i in re.findall(r"\biteration\s+(\d+)/", second)] == list(range(saved + 1, ITERS + 1))
    assert _probe_steps(run) == list(range(ITERS))  # the probe continues at the loaded iteration
    # the other task ran on untouched
    dense = _read(jobs["sweep"]["out"].replace("%a", "1"))
    assert "(restart 1)" not in dense and "USR1:" not in dense and "TERM: the ranks save" not in dense
    assert jobs["task1_after_requeue"].get("Restarts") == "0"


@pytest.mark.parametrize("script", [ONE, SWEEP])
def test_megatron_lm_sbatch_outside_slurm_one_error_line_and_status_2(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", script, TINY], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sbatch" in lines[0], r.stderr


def test_megatron_lm_sbatch_hybrid_layer_pattern_dry_run(tmp_path):
    """HYBRID_LAYER_PATTERN (no Slurm daemons needed: the job's variables given, --dry-run): the job launches
    pretrain_hybrid.py with --hybrid-layer-pattern after the args file's arguments, before the head and yours;
    without the pattern pretrain_gpt.py; a Megatron-LM without pretrain_hybrid.py is one error line (not a dry run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", MASTER_ADDR="n1", MB_CPU="1",
               MEGATRON_LM="/mlm", LM_HEAD_RANK="8", RUN_DIR=str(tmp_path / "run"), PYTHON="python")

    def srun_line(**more):
        r = subprocess.run(["bash", ONE, TINY, "--seed", "7", "--dry-run"], env={**env, **more}, capture_output=True,
                           text=True, cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return r.stdout, next(x for x in r.stdout.splitlines() if x.startswith("srun "))

    out, line = srun_line(HYBRID_LAYER_PATTERN="*-*-")
    assert "hybrid layer pattern *-*-, Megatron-LM /mlm/pretrain_hybrid.py" in out
    assert "-m megatron_bottleneck.megatron_lm /mlm/pretrain_hybrid.py --save " in line
    assert line.endswith(r" --probe-rank-token-budget 64 --hybrid-layer-pattern \*-\*- --lm-head-rank 8 --seed 7'")
    out, line = srun_line()
    assert "-m megatron_bottleneck.megatron_lm /mlm/pretrain_gpt.py --save " in line
    assert "hybrid layer pattern" not in out and "--hybrid-layer-pattern" not in line
    assert line.endswith(" --probe-rank-token-budget 64 --lm-head-rank 8 --seed 7'")
    r = subprocess.run(["bash", ONE, TINY], env={**env, "HYBRID_LAYER_PATTERN": "*-*-"}, capture_output=True,
                       text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no training script "
                                                                         "/mlm/pretrain_hybrid.py"), r.stderr
    assert "Megatron-LM has from core_v0.19" in lines[0] and not os.path.exists(tmp_path / "run")
