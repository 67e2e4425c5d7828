"""The trainer's learning-rate and weight-decay schedule (megatron-core's ``OptimizerParamScheduler``) and what a
resume does with the saved one.

The schedule: linear warmup from 0 to ``optim.lr`` over ``w = min(optim.warmup_steps, train.train_steps - 1)``
steps, then cosine decay to ``optim.min_lr`` at step ``T = train.train_steps``::

    lr(s) = lr * s / w                                                    s <= w
    lr(s) = min_lr + (lr - min_lr) / 2 * (1 + cos(pi * (s - w) / (T - w)))   w < s <= T

and constant weight decay ``optim.weight_decay``. A checkpoint holds the scheduler's state (its ``state_dict``:
``max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style, start_wd, end_wd, wd_incr_steps,
wd_incr_style`` and the step ``num_steps``). On resume every field but the step is compared with this run's;
``checkpoint.scheduler`` says what a difference does (Megatron-LM's two flags):

- ``error`` (default): one :class:`CheckpointError` line naming the fields, saved vs now, and the two settings
  below; nothing loads.
- ``config``: this config's schedule, continued from the saved step (``--override-opt_param-scheduler``):
  a run saved at step 20 of 20 and resumed with ``train.train_steps=40`` trains steps 21..40 at the learning
  rates of an uninterrupted 40-step run.
- ``checkpoint``: the saved schedule (``--use-checkpoint-opt_param-scheduler``); past its end the learning rate
  stays at its ``min_lr``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..base.errors import CheckpointError

SCHEDULER_MODES = ("error", "config", "checkpoint")

# scheduler state key -> the config setting it comes from (the styles are fixed by the trainer)
_SOURCES = {
    "max_lr": "optim.lr",
    "min_lr": "optim.min_lr",
    "lr_warmup_steps": "optim.warmup_steps (as used: at most train.train_steps - 1)",
    "lr_decay_steps": "train.train_steps",
    "lr_decay_style": "lr_decay_style",
    "start_wd": "optim.weight_decay",
    "end_wd": "optim.weight_decay",
    "wd_incr_steps": "train.train_steps",
    "wd_incr_style": "wd_incr_style",
}
# the per-parameter-group copies megatron-core's optimizer keeps (and saves) of the scheduler's learning rates
_GROUP_KEYS = ("max_lr", "min_lr")


def warmup_steps(cfg) -> int:
    """The warmup the schedule uses: ``optim.warmup_steps``, at most ``train.train_steps - 1`` (megatron-core
    needs warmup < decay steps)."""
    return max(0, min(cfg.optim.warmup_steps, cfg.train.train_steps - 1))


def warmup_warning(cfg) -> Optional[str]:
    """One line when ``optim.warmup_steps`` is not shorter than ``train.train_steps`` (the warmup is then cut
    to ``train_steps - 1`` and the learning rate decays within the last step); None otherwise."""
    o, t = cfg.optim, cfg.train
    if o.warmup_steps < t.train_steps:
        return None
    return (f"optim.warmup_steps={o.warmup_steps} is not shorter than train.train_steps={t.train_steps}: the "
            f"learning rate warms up for {warmup_steps(cfg)} steps to optim.lr={o.lr} and reaches optim.min_lr="
            f"{o.min_lr} at the last step; set optim.warmup_steps below train.train_steps (e.g. "
            f"{max(1, t.train_steps // 10)})")


def build_scheduler(optimizer, cfg) -> OptimizerParamScheduler:
    """Megatron-core's scheduler for ``cfg`` (see the module docstring), told by ``checkpoint.scheduler`` what
    its ``load_state_dict`` does with a saved schedule that differs: ``config`` sets its
    ``override_opt_param_scheduler``, ``checkpoint`` its ``use_checkpoint_opt_param_scheduler``, ``error`` neither
    (it then asserts equality; :func:`check_schedule` has already said it in one line)."""
    o, steps = cfg.optim, cfg.train.train_steps
    mode = cfg.checkpoint.scheduler
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup_steps(cfg),
        lr_decay_steps=steps, lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
        override_opt_param_scheduler=mode == "config", use_checkpoint_opt_param_scheduler=mode == "checkpoint")


def schedule_changes(saved: Dict, now: Dict) -> List[str]:
    """``"<setting>: saved <a>, now <b>"`` for each field of the scheduler state ``now`` (``state_dict()``) that
    ``saved`` holds with another value, the step aside; fields from one setting (train.train_steps gives the
    decay and the weight-decay steps) once."""
    out: Dict[str, str] = {}
    for key, value in now.items():
        if key == "num_steps" or key not in saved or saved[key] == value:
            continue
        name = _SOURCES.get(key, key)
        out.setdefault(name, f"{name}: saved {saved[key]}, now {value}")
    return list(out.values())


def check_schedule(path: str, saved: Dict, scheduler: OptimizerParamScheduler, mode: str) -> None:
    """With ``checkpoint.scheduler=error``: one :class:`CheckpointError` line when the schedule saved in the
    checkpoint at ``path`` (its scheduler state ``saved``) differs from ``scheduler``'s (this config's). The
    same on every rank (the state is), before anything loads."""
    changes = schedule_changes(saved, scheduler.state_dict())
    if mode != "error" or not changes:
        return
    step = saved.get("num_steps")
    raise CheckpointError(
        f"cannot resume from {path}: its learning-rate schedule differs from this config's "
        f"({'; '.join(changes)}). Set checkpoint.scheduler=config to follow this config's schedule from the saved "
        f"step {step} (Megatron-LM's --override-opt_param-scheduler), or checkpoint.scheduler=checkpoint to keep "
        f"the saved schedule (--use-checkpoint-opt_param-scheduler).")


def set_group_learning_rates(optimizer, old: Dict, new: Dict) -> None:
    """In every parameter group of ``optimizer`` whose ``max_lr`` / ``min_lr`` is ``old``'s, set ``new``'s.
    Megatron-core's optimizer keeps these copies per group, saves them, takes them back from the checkpoint at
    load (0.19 matches the saved groups to the live ones by them) and its scheduler prefers them to its own: a
    resume that changes ``optim.lr`` sets the saved values before the optimizer loads and the followed ones
    after. Groups with other values (a per-group override) are left alone."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.param_groups:
            for key in _GROUP_KEYS:
                if key in group and key in old and key in new and group[key] == old[key]:
                    group[key] = new[key]


def restore_schedule(scheduler: OptimizerParamScheduler, optimizer, saved: Dict) -> None:
    """Load the saved scheduler state into ``scheduler`` (what it keeps follows ``checkpoint.scheduler``, see
    :func:`build_scheduler`) and point the optimizer's per-group learning rates at the schedule followed; the
    optimizer's state must already be loaded (see :func:`set_group_learning_rates`)."""
    scheduler.load_state_dict(saved)  # then sets every group's lr and weight decay at the saved step
    set_group_learning_rates(optimizer, saved, {k: getattr(scheduler, k) for k in _GROUP_KEYS})
    scheduler.step(increment=0)  # the group learning rates at the saved step, from the groups' new values
