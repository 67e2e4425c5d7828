"""launch/train.sbatch and launch/rank_sweep.sbatch on a real two-node Slurm cluster (CPU ranks, gloo).

One module fixture submits everything at once and waits (about 1.5-3 min on 2 cores):
  A  train.sbatch, 2 nodes x 2 ranks: TP=2 inside a node, DP=2 across the nodes (world 4), uninterrupted;
  B  the same job, sent USR1 (``scancel --signal=USR1 --batch``) after its first steps: the trap forwards it,
     the ranks save and stop, the job requeues itself, and the rerun resumes from the checkpoint;
  C  rank_sweep.sbatch as a job array over three head ranks (1 node x 1 rank each): the paper's 2B recipe
     (examples/llama_2b_rank_sweep.yaml) at a tiny width, on real text (a SentencePiece-tokenised corpus);
  D  train.sbatch and rank_sweep.sbatch with --dry-run;
  G  train.sbatch on nodes without GPUs and without MB_CPU=1: one error line, status 2, nothing trained;
  L  the same training as A on this machine: ``megatron-bottleneck train CFG --nproc 4`` (``train.run``).
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.sbatch")
SWEEP = os.path.join(REPO, "launch", "rank_sweep.sbatch")
STEPS = 100  # long enough that job B is still training when USR1 reaches it
RECIPE = os.path.join(REPO, "examples", "llama_2b_rank_sweep.yaml")
WORDS = ("gradient bottleneck softmax vocabulary hidden rank head logit token model train learn the a of to "
         "and in is was for on with as by at from").split()


def _tiny_recipe(tmp):
    """Overrides that shrink the 2B recipe to a CPU-sized width, on a real-text corpus written here."""
    import random

    from megatron_bottleneck.data import tokenize_to_indexed, train_tokenizer

    rng = random.Random(0)
    text = os.path.join(tmp, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(600)))
    model = train_tokenizer([text], 100, os.path.join(tmp, "tok", "sp"))
    prefix = tokenize_to_indexed([text], model, os.path.join(tmp, "data", "corpus"))["prefix"]
    return ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=128",
            "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false", "train.train_steps=6",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=3", "train.eval_iters=1",
            "train.precision=fp32", "optim.warmup_steps=2", "probe.rank_interval=3", "probe.rank_token_budget=64",
            f"data.train_prefix={prefix}", "logging.tensorboard=false"]


def _metrics(run_dir):
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    from megatron_bottleneck.data import SpamLangConfig, generate_spamlang

    c = slurm_cluster
    tmp = str(tmp_path_factory.mktemp("slurm"))
    data = generate_spamlang(SpamLangConfig(64, 8, 800, seed=3), os.path.join(tmp, "data", "spam"))
    cfg = {
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8, "head_rank": 8},
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_steps": STEPS, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": STEPS // 2,
                  "log_interval": 50},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "logging": {"tensorboard": False},
    }
    config = os.path.join(tmp, "tiny.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHON": sys.executable,
           "MB_CPU": "1", "NPROC_PER_NODE": "2", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    out = {"tmp": tmp, "config": config}

    def submit(name, script, args, extra=(), job_env=env, **more_env):
        o = os.path.join(tmp, f"{name}.out")
        # the scripts request 8 GPUs per node; this cluster has none (CPU ranks on purpose: MB_CPU=1)
        job = c.sbatch(["-o", o, "-J", f"mb-{name}", "--gpus-per-node=0", *extra, script, *args],
                       env={**job_env, **more_env}, cwd=tmp)
        out[name] = {"job": job, "out": o}
        return job

    a = submit("a", TRAIN, [config], RUN_DIR=os.path.join(tmp, "a"))
    b = submit("b", TRAIN, [config], RUN_DIR=os.path.join(tmp, "b"))
    sweep = submit("sweep", SWEEP, [RECIPE, *_tiny_recipe(tmp)], ["--array=0-2"], RANKS="4 8 dense",
                   RUNS_ROOT=os.path.join(tmp, "runs"), SWEEP_NAME="sw", NPROC_PER_NODE="1")
    dry = submit("dry", TRAIN, [config, "train.seed=5", "--dry-run"], RUN_DIR=os.path.join(tmp, "dry"))
    dry_sweep = submit("dry_sweep", SWEEP, [config, "--dry-run"], ["--array=1"], RANKS="4 8 dense",
                       RUNS_ROOT=os.path.join(tmp, "runs_dry"), SWEEP_NAME="sw", NPROC_PER_NODE="1")
    nogpu = submit("nogpu", TRAIN, [config], job_env={k: v for k, v in env.items() if k != "MB_CPU"},
                   RUN_DIR=os.path.join(tmp, "nogpu"))
    local_dir = os.path.join(tmp, "local")
    local = subprocess.Popen([sys.executable, "-m", "megatron_bottleneck.cli", "train", config,
                              f"logging.dir={local_dir}/logs", "--nproc", "4"], env={**os.environ, **env}, cwd=tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # B: USR1 to the batch shell once it has logged a step
    deadline = time.time() + 240
    while len(_metrics(os.path.join(tmp, "b"))) < 1:
        assert time.time() < deadline, "job B logged no step in time:\n" + _read(out["b"]["out"])[-3000:]
        assert c.state(b) in ("PENDING", "RUNNING", "CONFIGURING"), _read(out["b"]["out"])[-3000:]
        time.sleep(0.1)
    c.run(["scancel", "--signal=USR1", "--batch", b])
    out["b"]["signalled_after"] = len(_metrics(os.path.join(tmp, "b")))
    while not (c.job(b).get("Restarts") == "1" and c.state(b) == "PENDING"):
        assert time.time() < deadline, f"job B was not requeued: {c.job(b)}\n" + _read(out["b"]["out"])[-3000:]
        time.sleep(0.2)
    out["b"]["pending"] = c.job(b)
    out["b"]["steps_before_requeue"] = len(_metrics(os.path.join(tmp, "b")))
    # A requeued job otherwise waits ~120 s. Start it only once both nodes have finished cleaning up the
    # first run: a launch racing that cleanup is refused by slurmd ("Job credential revoked").
    while "COMPLETING" in c.run(["scontrol", "show", "nodes"]).stdout or \
            "COMPLETING" in c.run(["squeue", "-h", "-t", "CG", "-o", "%T"]).stdout:
        assert time.time() < deadline, "the nodes did not finish cleaning up job B's first run"
        time.sleep(0.2)
    time.sleep(3)
    c.run(["scontrol", "update", f"JobId={b}", "StartTime=now"])

    out["states"] = c.wait([a, b, f"{sweep}_0", f"{sweep}_1", f"{sweep}_2", dry, f"{dry_sweep}_1", nogpu],
                           timeout=300)
    out["b"]["final"] = c.job(b)
    out["local"] = {"output": local.communicate(timeout=300)[0], "rc": local.returncode, "dir": local_dir}
    out["seconds"] = time.time() - t0
    print(f"slurm jobs done in {out['seconds']:.0f} s (cluster up in {c.startup_s:.1f} s)")
    return out


def test_multinode_job_trains_like_a_local_run(jobs):
    assert jobs["states"][jobs["a"]["job"]] == "COMPLETED", _read(jobs["a"]["out"])[-3000:]
    assert jobs["local"]["rc"] == 0, jobs["local"]["output"][-3000:]
    text = _read(jobs["a"]["out"])
    assert "on n[1-2]: 2 node(s) x 2 rank(s), master n1:" in text
    assert "SignalException" not in text and f"finished at step {STEPS}" in text
    a, local = _metrics(os.path.join(jobs["tmp"], "a")), _metrics(jobs["local"]["dir"])
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in local], rel=1e-6, abs=1e-7)
    valid = [(r["step"], r["valid_loss"]) for r in a if "valid_loss" in r]
    assert [s for s, _ in valid] == [STEPS // 2, STEPS]
    assert [v for _, v in valid] == pytest.approx([r["valid_loss"] for r in local if "valid_loss" in r], rel=1e-6)
    assert os.path.exists(os.path.join(jobs["tmp"], "a", "checkpoints", "latest"))  # default checkpoint dir


def test_usr1_saves_requeues_and_resumes_exactly(jobs):
    b = jobs["b"]
    assert jobs["states"][b["job"]] == "COMPLETED", _read(b["out"])[-3000:]
    text = _read(b["out"])
    assert "USR1: asking the ranks to save and stop" in text and f"requeueing job {b['job']}" in text
    saved = int(re.search(r"saved at step (\d+), exiting", text).group(1))
    assert b["signalled_after"] <= saved < STEPS and saved == b["steps_before_requeue"]  # stopped mid-run
    assert "EOFError" not in text and "could not signal" not in text
    assert f"resumed from {jobs['tmp']}/b/checkpoints/iter_{saved:07d} at step {saved}" in text
    assert "(restart 1)" in text and b["final"]["Restarts"] == "1"
    rows, full = _metrics(os.path.join(jobs["tmp"], "b")), _metrics(os.path.join(jobs["tmp"], "a"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step lost or repeated
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]  # bitwise: the uninterrupted job's losses


def test_rank_sweep_array_runs_the_2b_recipe_per_rank_and_reports(jobs):
    from megatron_bottleneck.report import write_report

    sweep = jobs["sweep"]["job"]
    root = os.path.join(jobs["tmp"], "runs", "sw")
    for task, rank, head in ((0, "4", 4), (1, "8", 8), (2, "dense", None)):
        assert jobs["states"][f"{sweep}_{task}"] == "COMPLETED", _read(jobs["sweep"]["out"])[-3000:]
        run = os.path.join(root, f"r{rank}")
        assert [r["step"] for r in _metrics(run)] == list(range(1, 7))
        with open(os.path.join(run, "logs", "config.yaml")) as f:
            saved = yaml.safe_load(f)
        assert saved["model"]["head_rank"] == head and saved["parallel"]["tensor_model_parallel_size"] == 1
        assert saved["optim"]["lr"] == 3e-4 and saved["train"]["eval_iters"] == 1  # the recipe, shrunk
        assert os.path.exists(os.path.join(run, "checkpoints", "latest"))
    assert sorted(os.listdir(root)) == ["r4", "r8", "rdense"]
    report = _read(write_report(root))
    assert "## Head-rank sweep" in report and "| 4 |" in report and "Rank of the logit gradient" in report


def test_dry_run_prints_the_commands_and_runs_nothing(jobs):
    text = _read(jobs["dry"]["out"])
    dry = os.path.join(jobs["tmp"], "dry")
    assert "dry run: would run" in text and f"mkdir -p {dry}" in text
    line = next(x for x in text.splitlines() if x.startswith("srun "))
    assert line.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'echo $$ > "
                           f"{dry}/.launch/torchrun.{jobs['dry']['job']}.$SLURM_NODEID.pid && exec ")
    assert (f"{sys.executable} -m torch.distributed.run --nnodes 2 --node-rank $SLURM_NODEID --nproc-per-node 2 "
            f"--master-addr n1 --master-port ") in line
    assert (f"-m megatron_bottleneck.cli train {jobs['config']} checkpoint.dir={dry}/checkpoints "
            f"logging.dir={dry}/logs train.seed=5'") in line
    assert not os.path.exists(dry)
    text = _read(jobs["dry_sweep"]["out"])
    assert "head rank 8 ->" in text and "model.head_rank=8'" in text and "--nnodes 1 " in text
    assert not os.path.exists(os.path.join(jobs["tmp"], "runs_dry"))


def test_a_job_without_gpus_stops_in_one_line_unless_cpu_is_asked_for(jobs):
    g = jobs["nogpu"]
    assert jobs["states"][g["job"]] == "FAILED"
    text = _read(g["out"])
    errors = [line for line in text.splitlines() if line.startswith("error")]
    assert errors == [f"error: job {g['job']} sees no GPU on n1 (--gpus-per-node=0): submit with --gpus-per-node=N, "
                      "or train on CPU ranks on purpose with `MB_CPU=1 sbatch --gpus-per-node=0 ...`"], text
    assert "Traceback" not in text and not os.path.exists(os.path.join(jobs["tmp"], "nogpu", "logs"))


@pytest.mark.parametrize("script", [TRAIN, SWEEP])
def test_outside_slurm_one_error_line_and_status_2(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", script, "cfg.yaml"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sbatch" in lines[0], r.stderr
