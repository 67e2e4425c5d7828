"""Rank functions for the measure tests: a tiny trainer checkpoint and the probe's record of one batch."""
import os
from typing import Dict

from megatron_bottleneck.probe import GradientProbe, ProbeConfig
from megatron_bottleneck.train import Trainer, TrainConfig
from megatron_bottleneck.train.checkpoint import latest_checkpoint, load_model_only
from megatron_bottleneck.train.probe_checkpoint import _config


def train_and_probe(root: str, data: Dict, head_rank=4) -> Dict:
    """Train 2 steps and save; then, as ``megatron-bottleneck probe`` does, load the checkpoint and record the
    probe on the first global batch. Returns the checkpoint, the record and that batch's documents."""
    cfg = TrainConfig.from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8,
                  "head_rank": head_rank},
        "train": {"train_steps": 2, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 100,
                  "log_interval": 100},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "checkpoint": {"dir": os.path.join(root, "ckpt"), "save_interval": 2},
        "logging": {"dir": os.path.join(root, "logs"), "console": False, "tensorboard": False},
        "probe": {},
    })
    Trainer(cfg).train()
    ckpt = latest_checkpoint(os.path.join(root, "ckpt"))
    probe = GradientProbe(ProbeConfig(interval=1, vocab_size=64))
    trainer = Trainer(_config(ckpt, data["train_prefix"]), probe=probe)
    load_model_only(ckpt, [m.module for m in trainer.models])
    stream = trainer.batches("train")
    micro = [next(stream) for _ in range(trainer.num_micro)]
    probe.step = 0
    trainer.forward_backward(micro)
    probe.end_step()
    record = dict(probe.history[-1])
    probe.remove()
    docs = []
    for b in micro:
        assert bool((b["loss_mask"] == 1).all())
        for tokens, labels in zip(b["tokens"].tolist(), b["labels"].tolist()):
            assert tokens[1:] == labels[:-1]
            docs.append(tokens + labels[-1:])
    return {"checkpoint": ckpt, "record": record, "docs": docs}
