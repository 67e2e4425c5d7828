"""Elastic resume through launch/train.sbatch on the real two-node Slurm cluster (CPU ranks, gloo):
a job on two nodes (DP=2 across them) saves every 4 steps; a second job, on one node (DP=1), resumes from its
step-4 checkpoint and continues its losses within float32 reduction noise (relative 1e-5)."""
import json
import os
import shutil
import sys

import pytest
import yaml

from tests.slurm.test_slurm_launch import TRAIN, REPO, _metrics, _read

STEPS = 8


@pytest.fixture(scope="module")
def elastic_jobs(slurm_cluster, tmp_path_factory):
    from megatron_bottleneck.data import SpamLangConfig, generate_spamlang

    c = slurm_cluster
    tmp = str(tmp_path_factory.mktemp("slurm_elastic"))
    data = generate_spamlang(SpamLangConfig(64, 8, 800, seed=3), os.path.join(tmp, "data", "spam"))
    cfg = {
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8, "head_rank": 8},
        "train": {"train_steps": STEPS, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 0},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "checkpoint": {"save_interval": 4, "keep_last": 0},
        "logging": {"tensorboard": False},
    }
    config = os.path.join(tmp, "tiny.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    env = {"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHON": sys.executable,
           "MB_CPU": "1", "NPROC_PER_NODE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = {"tmp": tmp}
    two = os.path.join(tmp, "two")
    job = c.sbatch(["-o", os.path.join(tmp, "two.out"), "-J", "mb-two", "-N", "2", "--gpus-per-node=0", TRAIN, config],
                   env={**env, "RUN_DIR": two}, cwd=tmp)
    out["two"] = {"state": c.wait([job], timeout=300)[job], "out": os.path.join(tmp, "two.out"), "dir": two}
    # the one-node job starts from the two-node job's step-4 checkpoint
    one = os.path.join(tmp, "one")
    os.makedirs(os.path.join(one, "checkpoints"))
    shutil.copytree(os.path.join(two, "checkpoints", "iter_0000004"), os.path.join(one, "checkpoints", "iter_0000004"))
    with open(os.path.join(one, "checkpoints", "latest"), "w") as f:
        f.write("iter_0000004")
    job = c.sbatch(["-o", os.path.join(tmp, "one.out"), "-J", "mb-one", "-N", "1", "--gpus-per-node=0", TRAIN, config],
                   env={**env, "RUN_DIR": one}, cwd=tmp)
    out["one"] = {"state": c.wait([job], timeout=300)[job], "out": os.path.join(tmp, "one.out"), "dir": one}
    return out


def test_a_job_saved_on_two_nodes_resumes_on_one(elastic_jobs):
    two, one = elastic_jobs["two"], elastic_jobs["one"]
    assert two["state"] == "COMPLETED", _read(two["out"])[-3000:]
    assert one["state"] == "COMPLETED", _read(one["out"])[-3000:]
    assert "2 node(s) x 1 rank(s)" in _read(two["out"])
    text = _read(one["out"])
    assert "1 node(s) x 1 rank(s)" in text
    assert f"resumed from {one['dir']}/checkpoints/iter_0000004 at step 4 (resharded to this layout" in text
    with open(os.path.join(two["dir"], "checkpoints", "iter_0000004", "layout.json")) as f:
        assert json.load(f)["data_parallel_size"] == 2
    full, rest = _metrics(two["dir"]), _metrics(one["dir"])
    assert [r["step"] for r in full] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rest] == list(range(5, STEPS + 1))  # no step repeated or skipped
    assert [r["loss"] for r in rest] == pytest.approx([r["loss"] for r in full[4:]], rel=1e-5)
