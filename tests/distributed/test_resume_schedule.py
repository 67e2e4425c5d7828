"""Extending a run (issue 26): saved at its last step (train.train_steps=20, warmup 4) and resumed with
train.train_steps=40. checkpoint.scheduler=error (the default) refuses in one line; config trains steps 21..40
at the learning rates of an uninterrupted 40-step run, and its losses are bitwise those of one process that
switched to the 40-step schedule at step 20; checkpoint keeps the finished schedule (min_lr). One CPU rank."""
import math
import os
import shutil

import pytest

import megatron_bottleneck as mb
from tests.distributed import trainer_ranks as tr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spamlang):
    tmp = str(tmp_path_factory.mktemp("schedule"))
    ckpt = os.path.join(tmp, "ckpt")
    first = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "a"), spamlang, ckpt, 20, timeout=600)[0]
    for mode in ("config", "checkpoint", "lr"):
        shutil.copytree(ckpt, f"{ckpt}_{mode}")
    out = {"first": first, "ckpt": ckpt}
    out["error"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "b"), spamlang, ckpt, 40, timeout=600)[0]
    out["config"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "c"), spamlang, f"{ckpt}_config", 40, "config",
                              timeout=600)[0]
    out["checkpoint"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "d"), spamlang, f"{ckpt}_checkpoint", 23,
                                  "checkpoint", timeout=600)[0]
    # a new peak learning rate too (megatron-core's optimizer keeps and saves per-group copies of it)
    out["lr"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "g"), spamlang, f"{ckpt}_lr", 40, "config",
                          {"lr": 2e-2}, 22, timeout=600)[0]
    out["uninterrupted"] = mb.launch(tr.schedule_run, 1, os.path.join(tmp, "e"), spamlang, None, 40, timeout=600)[0]
    out["switched"] = mb.launch(tr.switched_schedule_run, 1, os.path.join(tmp, "f"), spamlang, 20, 40,
                                timeout=600)[0]
    return out


def test_the_first_part_ends_its_decay(runs):
    first = runs["first"]
    assert first["iteration"] == 20 and first["lrs"][-1] == 0.0  # min_lr reached at its last step


def test_an_extension_is_refused_in_one_line_by_default(runs):
    msg = runs["error"]["error"]
    assert "\n" not in msg and msg.startswith(f"cannot resume from {runs['ckpt']}/iter_0000020: ")
    assert "train.train_steps: saved 20, now 40" in msg
    assert "checkpoint.scheduler=config" in msg and "checkpoint.scheduler=checkpoint" in msg


def test_following_the_config_continues_the_longer_schedule(runs):
    resumed, full = runs["config"], runs["uninterrupted"]
    assert resumed["steps"] == list(range(21, 41))
    assert resumed["lrs"] == full["lrs"][20:]  # the uninterrupted 40-step run's learning rates
    assert min(resumed["lrs"][:-1]) > 0.0
    # the losses continue the saved run: bitwise those of one process that switched schedules at step 20
    assert runs["switched"]["losses"][:20] == runs["first"]["losses"]
    assert resumed["losses"] == runs["switched"]["losses"][20:]
    assert sum(resumed["losses"][-5:]) < sum(resumed["losses"][:5]) - 0.05  # and it learns


def test_following_the_checkpoint_keeps_the_finished_schedule(runs):
    kept = runs["checkpoint"]
    assert kept["steps"] == [21, 22, 23] and kept["lrs"] == [0.0, 0.0, 0.0]


def test_following_the_config_takes_a_new_peak_learning_rate(runs):
    """lr(s) = lr / 2 (1 + cos(pi (s - 4) / 36)) (min_lr 0) at s = 21, 22, in float64."""
    new = runs["lr"]
    assert new["steps"] == [21, 22]
    assert new["lrs"] == pytest.approx([1e-2 * (1 + math.cos(math.pi * (s - 4) / 36)) for s in (21, 22)],
                                       rel=1e-12)
