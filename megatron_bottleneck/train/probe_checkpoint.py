"""Bottleneck figures of a saved checkpoint on a dataset (``megatron-bottleneck probe``).

Loads the model of a trainer checkpoint (any TP/PP layout), runs forward-backward on ``batches`` global
batches of the dataset (no optimizer step) with the probe on, and returns the mean of each figure plus
the rank analysis over all tokens seen.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional

import torch.distributed as dist

from ..base.errors import CheckpointError
from ..integrations.launch import launch
from ..probe import GradientProbe, ProbeConfig
from .checkpoint import latest_checkpoint, load_model_only
from .config import TrainConfig
from .trainer import Trainer

__all__ = ["probe_checkpoint", "resolve_checkpoint"]

MEAN_KEYS = ("destroyed_ratio", "visible_cosine", "isotropic_baseline", "update_cosine", "grad_norm",
             "hidden_grad_norm")
RANK_PREFIXES = ("numerical_rank", "effective_rank", "energy_", "components_", "eym_", "rank_")


def resolve_checkpoint(path: str) -> str:
    """``path`` itself (an ``iter_*`` directory with ``config.yaml``) or the latest checkpoint under it."""
    if os.path.exists(os.path.join(path, "config.yaml")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path!r}: expected an iter_* directory or a directory with a "
                              "'latest' file (the trainer's checkpoint.dir).")
    return latest


def _config(ckpt: str, data_prefix: str) -> TrainConfig:
    cfg = TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    cfg.data.train_prefix, cfg.data.valid_prefix = data_prefix, None
    cfg.checkpoint.dir, cfg.probe = None, {}
    cfg.logging.console, cfg.logging.tensorboard = False, False
    cfg.logging.dir = os.path.join(ckpt, "probe_logs")
    return cfg


def _probe_rank(ckpt: str, data_prefix: str, batches: int) -> Optional[Dict]:
    cfg = _config(ckpt, data_prefix)
    tokens = batches * cfg.train.global_batch_size * cfg.model.seq_length
    probe = GradientProbe(ProbeConfig(interval=1, update_interval=1, rank_interval=batches,
                                      rank_token_budget=min(tokens, 4096), vocab_size=cfg.model.vocab_size))
    trainer = Trainer(cfg, probe=probe)
    load_model_only(ckpt, [m.module for m in trainer.models])
    stream = trainer.batches("train")
    for step in range(batches):
        probe.step = step
        trainer.forward_backward([next(stream) for _ in range(trainer.num_micro)])  # the probe's step, ended
    out: Dict = {"checkpoint": ckpt, "batches": batches}
    for key in MEAN_KEYS:
        vals = [h[key] for h in probe.history if key in h]
        if vals:
            out[key] = sum(vals) / len(vals)
    for h in probe.history:
        out.update({k: v for k, v in h.items() if k.startswith(RANK_PREFIXES)})
    reporter = probe.is_reporter
    probe.remove()
    return out if reporter or not dist.is_initialized() else None


def probe_checkpoint(path: str, data_prefix: str, batches: int = 4, nproc: Optional[int] = None,
                     device: Optional[str] = "auto") -> Dict:
    """Figures of the checkpoint at ``path`` on ``data_prefix``, on ``nproc`` local ranks (default: the
    checkpoint's TP x PP) on ``device`` (:func:`~megatron_bottleneck.base.device.resolve_device`): auto, one
    GPU per rank when GPUs are visible (NCCL, the checkpoint's precision: auto is bf16) else CPU ranks (gloo,
    CPU mode, fp32); cpu; cuda (a GPU per rank, or one :class:`~megatron_bottleneck.base.errors.DeviceError`
    line)."""
    ckpt = resolve_checkpoint(path)
    cfg = _config(ckpt, data_prefix)
    world = nproc or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    cfg.check_world(world)
    results = launch(functools.partial(_probe_rank, ckpt, data_prefix, batches), world, timeout=3600, device=device)
    return next(r for r in results if r is not None)
