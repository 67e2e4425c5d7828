"""The trainer's schedule on resume (``checkpoint.scheduler``): a saved schedule that differs from the config is
one CheckpointError line (error), this config's continued from the saved step (config), or the saved one kept
(checkpoint); learning rates against the warmup + cosine formula in float64. Warmup longer than the run: one
warning line."""
import math

import pytest
import torch

from megatron_bottleneck.base.errors import CheckpointError, ConfigError
from megatron_bottleneck.train import TrainConfig
from megatron_bottleneck.train.lr_schedule import (build_scheduler, check_schedule, restore_schedule,
                                                   set_group_learning_rates, warmup_warning)


def cfg(steps=20, warmup=4, lr=1e-2, min_lr=1e-4, mode="error", wd=0.1):
    return TrainConfig.from_dict({"train": {"train_steps": steps},
                                  "optim": {"lr": lr, "min_lr": min_lr, "warmup_steps": warmup, "weight_decay": wd},
                                  "checkpoint": {"scheduler": mode}})


def optimizer(c):
    """A torch optimizer whose groups carry megatron-core's per-group schedule copies (max_lr, min_lr)."""
    w = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [w], "max_lr": c.optim.lr, "min_lr": c.optim.min_lr, "wd_mult": 1.0}],
                           lr=0.0)


def reference_lr(step, steps, warmup, lr, min_lr):
    """float64 warmup + cosine, from the formula."""
    if step <= warmup:
        return lr * step / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def run(c, steps, sched=None, opt=None):
    """(learning rates after each of ``steps`` steps, scheduler, optimizer)."""
    opt = opt or optimizer(c)
    sched = sched or build_scheduler(opt, c)
    lrs = []
    for _ in range(steps):
        sched.step(increment=1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs, sched, opt


def saved_at_end(c):
    """The scheduler state of a run of ``c`` saved at its last step."""
    return run(c, c.train.train_steps)[1].state_dict()


def resume(saved, c, steps):
    """Resume ``c`` from the scheduler state ``saved`` as the trainer does; the learning rates of ``steps`` more."""
    opt = optimizer(c)
    sched = build_scheduler(opt, c)
    set_group_learning_rates(opt, sched.state_dict(), saved)  # the groups as the optimizer's load leaves them
    restore_schedule(sched, opt, saved)
    return run(c, steps, sched, opt)[0]


def test_the_schedule_follows_the_formula():
    lrs = run(cfg(40), 40)[0]
    assert lrs == pytest.approx([reference_lr(s, 40, 4, 1e-2, 1e-4) for s in range(1, 41)], rel=1e-12, abs=1e-15)


def test_an_extended_run_is_one_line_naming_the_fields_and_both_settings():
    saved = saved_at_end(cfg(20))
    c = cfg(40)
    with pytest.raises(CheckpointError) as e:
        check_schedule("ckpt/iter_0000020", saved, build_scheduler(optimizer(c), c), "error")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot resume from ckpt/iter_0000020: its learning-rate schedule")
    assert "(train.train_steps: saved 20, now 40)" in msg  # decay and weight-decay steps: one setting, once
    assert "checkpoint.scheduler=config" in msg and "checkpoint.scheduler=checkpoint" in msg
    assert "saved step 20" in msg


def test_every_setting_of_the_schedule_is_compared():
    saved = saved_at_end(cfg(20))
    c = cfg(20, warmup=6, lr=2e-2, min_lr=0.0, wd=0.0)
    with pytest.raises(CheckpointError) as e:
        check_schedule("p", saved, build_scheduler(optimizer(c), c), "error")
    msg = str(e.value)
    for change in ("optim.lr: saved 0.01, now 0.02", "optim.min_lr: saved 0.0001, now 0.0",
                   "optim.warmup_steps (as used: at most train.train_steps - 1): saved 4, now 6",
                   "optim.weight_decay: saved 0.1, now 0.0"):
        assert change in msg
    check_schedule("p", saved, build_scheduler(optimizer(cfg(20)), cfg(20)), "error")  # the same: accepted
    for mode in ("config", "checkpoint"):
        check_schedule("p", saved, build_scheduler(optimizer(c), c), mode)


def test_follow_the_config_continues_the_new_schedule_from_the_saved_step():
    saved = saved_at_end(cfg(20))
    assert saved["num_steps"] == 20
    resumed = resume(saved, cfg(40, mode="config"), 20)
    uninterrupted = run(cfg(40), 40)[0]
    assert resumed == uninterrupted[20:]  # the same scheduler arithmetic: exactly
    assert resumed == pytest.approx([reference_lr(s, 40, 4, 1e-2, 1e-4) for s in range(21, 41)], rel=1e-12)
    assert min(resumed[:-1]) > 1e-4  # not the finished decay's lr


def test_follow_the_config_takes_a_new_peak_learning_rate():
    saved = saved_at_end(cfg(20))
    resumed = resume(saved, cfg(40, lr=3e-2, mode="config"), 20)
    assert resumed == pytest.approx([reference_lr(s, 40, 4, 3e-2, 1e-4) for s in range(21, 41)], rel=1e-12)


def test_follow_the_checkpoint_keeps_the_saved_schedule():
    saved = saved_at_end(cfg(20))
    resumed = resume(saved, cfg(40, lr=3e-2, mode="checkpoint"), 5)
    assert resumed == pytest.approx([1e-4] * 5, rel=1e-12)  # past its end: its min_lr
    mid = run(cfg(20), 10)[1].state_dict()
    resumed = resume(mid, cfg(40, lr=3e-2, mode="checkpoint"), 10)
    assert resumed == pytest.approx([reference_lr(s, 20, 4, 1e-2, 1e-4) for s in range(11, 21)], rel=1e-12)


def test_warmup_longer_than_the_run_is_one_warning_line():
    msg = warmup_warning(cfg(40, warmup=51))
    assert msg is not None and "\n" not in msg
    assert msg.startswith("optim.warmup_steps=51 is not shorter than train.train_steps=40")
    assert "warms up for 39 steps" in msg
    assert warmup_warning(cfg(40, warmup=4)) is None
    assert warmup_warning(cfg(40, warmup=40)) is not None


def test_the_setting_names_its_choices():
    with pytest.raises(ConfigError, match=r"checkpoint.scheduler must be one of error, config, checkpoint"):
        cfg(mode="override")
    assert TrainConfig().checkpoint.scheduler == "error"
