"""Rank functions for the trainer tests (real Megatron training on CPU ranks)."""
import os
import signal
from typing import Dict, List, Optional

import torch

from megatron_bottleneck.base.errors import CheckpointError
from megatron_bottleneck.train import Trainer, TrainConfig


def config(log_dir, data, ckpt=None, steps=12, **sections):
    d = {
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8, "head_rank": 8},
        # ~1000-parameter buckets: several buckets per rank, so the overlapped reduce / all-gather (on by default)
        # really runs bucket by bucket
        "parallel": {"tensor_model_parallel_size": 2, "ddp_bucket_size": 1000},
        "train": {"train_steps": steps, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 4,
                  "log_interval": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "checkpoint": {"dir": ckpt, "save_interval": 5, "keep_last": 2},
        "logging": {"dir": log_dir, "console": False},
        "probe": {"interval": 2},
    }
    for k, v in sections.items():
        if k == "probe":
            d[k] = dict(v or d[k])
        else:
            d[k].update(v)
    return TrainConfig.from_dict(d)


def adam_state_numel(trainer):
    """Adam moments held on this rank (the distributed optimizer keeps only this DP rank's shard)."""
    subs = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return sum(st["exp_avg"].numel() for sub in subs for st in sub.optimizer.state.values())


def sigterm_at(stop_step):
    """An ``on_step`` callback that sends this process SIGTERM after step ``stop_step``."""
    def on_step(step, _rec):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


class RecordingTrainer(Trainer):
    """The trainer, keeping the tokens of every training micro-batch this rank reads (``read``)."""

    def batches(self, split="train", consumed=0):
        stream = super().batches(split, consumed)
        return self._recorded(stream) if split == "train" else stream

    def _recorded(self, stream):
        self.read = []
        for batch in stream:
            self.read.append(batch["tokens"].clone())
            yield batch


def train_run(log_dir: str, data: Dict, ckpt: Optional[str] = None, stop_at: Optional[int] = None,
              steps: int = 12, distributed_optimizer: bool = True, tp: int = 2, probe: Optional[Dict] = None,
              overlap: Optional[bool] = None, async_save: Optional[bool] = None,
              optimizer_format: Optional[str] = None) -> Dict:
    """One training run (resuming from ``ckpt`` if it holds a checkpoint); SIGTERM after ``stop_at``.
    ``samples``: per step, this rank's training tokens ``[global_batch / dp, s]``, with ``dp_rank``/``tp_rank``.
    ``overlap`` sets both overlaps (grad reduce, and param gather with the distributed optimizer); None: auto.
    ``optimizer_format``: ``checkpoint.optimizer_format`` of this run's saves; None: the default."""
    from megatron.core import parallel_state as ps

    par = {"distributed_optimizer": distributed_optimizer, "tensor_model_parallel_size": tp}
    if overlap is not None:
        par.update(overlap_grad_reduce=overlap, overlap_param_gather=overlap and distributed_optimizer)
    ckpt_section = {"async_save": async_save}
    if optimizer_format is not None:
        ckpt_section["optimizer_format"] = optimizer_format
    cfg = config(log_dir, data, ckpt=ckpt, steps=steps, probe=probe or {}, parallel=par, checkpoint=ckpt_section)
    trainer = RecordingTrainer(cfg, on_step=None if stop_at is None else sigterm_at(stop_at))
    out = trainer.train()
    numel = adam_state_numel(trainer)
    hist = out["history"]
    n = trainer.num_micro
    samples = [torch.cat(trainer.read[i:i + n]) for i in range(0, len(hist) * n, n)]
    return {"losses": [h["loss"] for h in hist], "steps": [h["step"] for h in hist],
            "valid": [h.get("valid_loss") for h in hist], "stopped": out["stopped_by_signal"],
            "iteration": out["iteration"], "numel": numel, "samples": samples, "dp_rank": trainer.dp_rank,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "probe_rank": [{k: v for k, v in h.items() if k.startswith(("numerical_rank", "effective_rank"))}
                           | {"step": h["step"]} for h in trainer.probe.history if "numerical_rank" in h],
            "options": trainer.options}


def global_samples(results) -> List[torch.Tensor]:
    """Per step, the global batch's tokens: the DP ranks' rows in DP order (TP rank 0 of each)."""
    ranks = sorted((r for r in results if r["tp_rank"] == 0), key=lambda r: r["dp_rank"])
    return [torch.cat([r["samples"][i] for r in ranks]) for i in range(len(ranks[0]["samples"]))]


def resume_error(log_dir: str, data: Dict, ckpt: str, model: Optional[Dict] = None,
                 parallel: Optional[Dict] = None) -> Optional[str]:
    try:
        Trainer(config(log_dir, data, ckpt=ckpt, model=model or {}, parallel=parallel or {}))
    except CheckpointError as e:
        return str(e)
    return None


def schedule_config(log_dir, data, ckpt, steps, scheduler="error", **optim):
    """The smallest trainer run (one rank, TP=1, no probe, no validation) with warmup 4 and ``steps`` steps."""
    cfg = config(log_dir, data, ckpt=ckpt, steps=steps, parallel={"tensor_model_parallel_size": 1},
                 train={"eval_interval": 0}, optim={"warmup_steps": 4, **optim},
                 checkpoint={"save_interval": 0, "scheduler": scheduler, "async_save": False})
    cfg.probe = {}
    return cfg


def _history(trainer, out) -> Dict:
    hist = out["history"]
    return {"steps": [h["step"] for h in hist], "losses": [h["loss"] for h in hist],
            "lrs": [h["lr"] for h in hist], "iteration": out["iteration"]}


def schedule_run(log_dir: str, data: Dict, ckpt: Optional[str], steps: int, scheduler: str = "error",
                 optim: Optional[Dict] = None, stop_at: Optional[int] = None) -> Dict:
    """A run of :func:`schedule_config` (resuming from ``ckpt`` when it holds a checkpoint; SIGTERM after step
    ``stop_at``): per step the loss and the learning rate set after it (the one the next step's update uses),
    or ``error``: a CheckpointError's message."""
    try:
        trainer = Trainer(schedule_config(log_dir, data, ckpt, steps, scheduler, **(optim or {})),
                          on_step=None if stop_at is None else sigterm_at(stop_at))
    except CheckpointError as e:
        return {"error": str(e)}
    return _history(trainer, trainer.train())


def switched_schedule_run(log_dir: str, data: Dict, first: int, steps: int) -> Dict:
    """The reference of an extended run, uninterrupted: ``steps`` steps of one process whose learning rates
    follow the schedule of a ``first``-step run up to step ``first``, then the ``steps``-step schedule from
    there (what a run saved at ``first`` and resumed with ``checkpoint.scheduler=config`` must reproduce)."""
    from megatron_bottleneck.train.lr_schedule import build_scheduler

    cfg = schedule_config(log_dir, data, None, steps)
    trainer = Trainer(cfg)
    trainer.scheduler = build_scheduler(trainer.optimizer, schedule_config(log_dir, data, None, first))

    def on_step(step, _rec):
        if step == first:
            longer = build_scheduler(trainer.optimizer, cfg)
            longer.step(increment=first)
            trainer.scheduler = longer
    trainer.on_step = on_step
    return _history(trainer, trainer.train())
