"""Rank functions for the trainer tests (real Megatron training on CPU ranks)."""
import os
import signal

import megatron_bottleneck as mb
from megatron_bottleneck.train import Trainer, TrainConfig


def config(tmp, data, ckpt=None, steps=12, **sections):
    d = {
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8, "head_rank": 8},
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_steps": steps, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 4,
                  "log_interval": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "checkpoint": {"dir": ckpt, "save_interval": 5, "keep_last": 2},
        "logging": {"dir": os.path.join(tmp, "logs"), "console": False},
        "probe": {"interval": 2},
    }
    for k, v in sections.items():
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


def uninterrupted_then_killed(tmp, data):
    """4 ranks: TP=2 x DP=2, Megatron's distributed optimizer (the default) against the regular one."""
    sharded = Trainer(config(os.path.join(tmp, "a"), data))
    full = sharded.train()
    replicated = Trainer(config(os.path.join(tmp, "c"), data, parallel={"distributed_optimizer": False}))
    plain = replicated.train()

    part = Trainer(config(os.path.join(tmp, "b"), data, ckpt=os.path.join(tmp, "ckpt")), on_step=sigterm_at(7)).train()
    return {"full": [h["loss"] for h in full["history"]], "part": [h["loss"] for h in part["history"]],
            "plain": [h["loss"] for h in plain["history"]], "stopped": part["stopped_by_signal"],
            "iteration": part["iteration"], "numel": (adam_state_numel(sharded), adam_state_numel(replicated))}


def resume(tmp, data):
    out = Trainer(config(os.path.join(tmp, "b"), data, ckpt=os.path.join(tmp, "ckpt"))).train()
    return {"losses": [h["loss"] for h in out["history"]], "steps": [h["step"] for h in out["history"]],
            "valid": [h.get("valid_loss") for h in out["history"]]}


def two_rank_checks(tmp, data):
    """2 ranks (TP=2, DP=1): (1) pointed at the 4-rank checkpoint, a clear error before anything loads;
    (2) exact resume with the replicated (non-distributed) optimizer."""
    from megatron_bottleneck.errors import CheckpointError

    message = None
    try:
        Trainer(config(os.path.join(tmp, "d"), data, ckpt=os.path.join(tmp, "ckpt")))
    except CheckpointError as e:
        message = str(e)
    plain = {"distributed_optimizer": False}
    full = Trainer(config(os.path.join(tmp, "e"), data, steps=6, parallel=plain)).train()

    ckpt = os.path.join(tmp, "ckpt_replicated")
    Trainer(config(os.path.join(tmp, "f"), data, ckpt=ckpt, steps=6, parallel=plain), on_step=sigterm_at(3)).train()
    rest = Trainer(config(os.path.join(tmp, "f"), data, ckpt=ckpt, steps=6, parallel=plain)).train()
    return {"message": message, "full": [h["loss"] for h in full["history"]],
            "resumed": [h["loss"] for h in rest["history"]]}
