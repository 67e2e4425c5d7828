"""Extending a run (issue 26): saved at its last step (train.train_steps=10, warmup 4) and resumed with
train.train_steps=20. checkpoint.scheduler=error (the default) refuses in one line; config trains steps 11..20
at the learning rates of an uninterrupted 20-step run, and its losses are bitwise those of one process that
switched to the 20-step schedule at step 10; checkpoint keeps the finished schedule (min_lr). One CPU rank."""
import math
import os
import shutil

import pytest

import megatron_bottleneck as mb
from tests.distributed import trainer_ranks as tr

FIRST, STEPS = 10, 20  # the saved run's steps and the extended schedule's (warmup 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spamlang):
    tmp = str(tmp_path_factory.mktemp("schedule"))
    ckpt = os.path.join(tmp, "ckpt")
    first = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "a"), spamlang, ckpt, FIRST, timeout=600)[0]
    for mode in ("config", "checkpoint", "lr"):
        shutil.copytree(ckpt, f"{ckpt}_{mode}")
    out = {"first": first, "ckpt": ckpt}
    out["error"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "b"), spamlang, ckpt, STEPS, timeout=600)[0]
    out["config"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "c"), spamlang, f"{ckpt}_config", STEPS, "config",
                              timeout=600)[0]
    out["checkpoint"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "d"), spamlang, f"{ckpt}_checkpoint", FIRST + 3,
                                  "checkpoint", timeout=600)[0]
    # a new peak learning rate too (megatron-core's optimizer keeps and saves per-group copies of it)
    out["lr"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "g"), spamlang, f"{ckpt}_lr", STEPS, "config",
                          {"lr": 2e-2}, FIRST + 2, timeout=600)[0]
    out["uninterrupted"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "e"), spamlang, None, STEPS, timeout=600)[0]
    out["switched"] = mb.launch(tr.switched_schedule_run, 1, os.path.join(tmp, "f"), spamlang, FIRST, STEPS,
                                timeout=600)[0]
    return out


def test_the_first_part_ends_its_decay(runs):
    first = runs["first"]
    assert first["iteration"] == FIRST and first["lrs"][-1] == 0.0  # min_lr reached at its last step


def test_an_extension_is_refused_in_one_line_by_default(runs):
    msg = runs["error"]["error"]
    assert "\n" not in msg and msg.startswith(f"cannot resume from {runs['ckpt']}/iter_{FIRST:07d}: ")
    assert f"train.train_steps: saved {FIRST}, now {STEPS}" in msg
    assert "checkpoint.scheduler=config" in msg and "checkpoint.scheduler=checkpoint" in msg


def test_following_the_config_continues_the_longer_schedule(runs):
    resumed, full = runs["config"], runs["uninterrupted"]
    assert resumed["steps"] == list(range(FIRST + 1, STEPS + 1))
    assert resumed["lrs"] == full["lrs"][FIRST:]  # the uninterrupted 20-step run's learning rates
    assert min(resumed["lrs"][:-1]) > 0.0
    # the losses continue the saved run: bitwise those of one process that switched schedules at step FIRST
    assert runs["switched"]["losses"][:FIRST] == runs["first"]["losses"]
    assert resumed["losses"] == runs["switched"]["losses"][FIRST:]
    assert sum(resumed["losses"][-3:]) < sum(resumed["losses"][:3]) - 0.03  # and it learns


def test_following_the_checkpoint_keeps_the_finished_schedule(runs):
    kept = runs["checkpoint"]
    assert kept["steps"] == [FIRST + 1, FIRST + 2, FIRST + 3] and kept["lrs"] == [0.0, 0.0, 0.0]


def test_following_the_config_takes_a_new_peak_learning_rate(runs):
    """lr(s) = lr / 2 (1 + cos(pi (s - 4) / (STEPS - 4))) (min_lr 0) at s = FIRST + 1, FIRST + 2, in float64."""
    new = runs["lr"]
    assert new["steps"] == [FIRST + 1, FIRST + 2]
    assert new["lrs"] == pytest.approx([1e-2 * (1 + math.cos(math.pi * (s - 4) / (STEPS - 4))) for s in (FIRST + 1, FIRST + 2)],
                                       rel=1e-12)
