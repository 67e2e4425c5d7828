"""GradientProbe on real GPTModel training steps (schedule driver, DDP, gloo): figures against a
brute-force float64 reference, TP=1 vs TP=2, PP=2 reporting, NaN handling, zero interference, logs.

Each run is launched on first use and shared by the tests that read it, so ``-k`` runs only what it needs.
"""
import functools
import math
import os

import pytest

import megatron_bottleneck as mb
from tests.distributed import probe_ranks

KEYS = ("grad_norm", "hidden_grad_norm", "destroyed_ratio", "visible_cosine", "isotropic_baseline",
        "update_cosine")
RUNS = {  # name: (world, tp, pp, sp, head rank, probe on, NaN at step)
    "tp1_lowrank": (1, 1, 1, False, 16, True, -1),
    "tp2_lowrank_sp": (2, 2, 1, True, 16, True, -1),
    "tp2_dense": (2, 2, 1, False, None, True, -1),
    "pp2": (2, 1, 2, False, 16, True, -1),
    "tp1_off": (1, 1, 1, False, 16, False, -1),
    "nan": (1, 1, 1, False, 16, True, 1),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    cache = {}

    def get(name):
        if name not in cache:
            world, tp, pp, sp, rank, on, nan_step = RUNS[name]
            fn = functools.partial(probe_ranks.probed_training, tp, pp, sp, rank, 3, on, str(tmp / name),
                                   nan_step=nan_step)
            cache[name] = (mb.launch(fn, world, timeout=300), str(tmp / name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["tp1_lowrank", "tp2_lowrank_sp", "tp2_dense", "pp2"])
def test_figures_match_bruteforce_reference(run, name):
    results, _ = run(name)
    for r in results:
        if not r["last_stage"]:
            assert r["history"] == [] and not r["reporter"]
            continue
        assert len(r["history"]) == len(r["refs"]) == 3
        for got, want in zip(r["history"], r["refs"]):
            for key in KEYS:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (name, key)
            assert 0.0 < got["destroyed_ratio"] < 1.0
            assert got["destroyed_ratio"] ** 2 + got["visible_cosine"] ** 2 == pytest.approx(1.0)


def test_tp1_and_tp2_agree(run):
    one = run("tp1_lowrank")[0][0]["history"]
    two = run("tp2_lowrank_sp")[0][0]["history"]
    for a, b in zip(one, two):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_one_reporter_writes_jsonl_and_tensorboard(run):
    results, log_dir = run("tp2_lowrank_sp")
    assert [r["reporter"] for r in results] == [True, False]
    rows = mb.read_jsonl(os.path.join(log_dir, "probe.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["probe/destroyed_ratio"] == pytest.approx(results[0]["history"][0]["destroyed_ratio"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(log_dir, "tensorboard"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("probe/destroyed_ratio")]
    assert values == pytest.approx([h["destroyed_ratio"] for h in results[0]["history"]], rel=1e-6)


def test_pipeline_last_stage_reports(run):
    results, _ = run("pp2")
    assert [r["reporter"] for r in results] == [False, True]


def test_probe_does_not_change_training(run):
    assert run("tp1_lowrank")[0][0]["losses"] == run("tp1_off")[0][0]["losses"]  # bitwise


def test_nan_gradient_is_reported_and_training_continues(run):
    (r,), log_dir = run("nan")
    assert len(r["losses"]) == 3 and math.isnan(r["losses"][1]) and math.isfinite(r["losses"][2])
    steps = {h["step"]: h for h in r["history"]}
    assert steps[1]["nonfinite_grad"] == 1.0 and math.isnan(steps[1]["destroyed_ratio"])
    assert steps[2]["nonfinite_grad"] == 0.0 and math.isfinite(steps[2]["destroyed_ratio"])
    rows = mb.read_jsonl(os.path.join(log_dir, "probe.jsonl"))
    assert rows[1]["probe/destroyed_ratio"] is None
