"""Bottleneck figures of a saved checkpoint on a dataset (``megatron-bottleneck probe``).

Loads the model of a trainer checkpoint (any TP/PP layout), runs forward-backward on ``batches`` global
batches of the dataset (no optimizer step) with the probe on, and returns the mean of each figure plus
the rank analysis over all tokens seen.
"""
from __future__ import annotations

import os
from typing import Dict, Optional


def _resolve(path: str) -> str:
    from ..train.checkpoint import latest_checkpoint

    if os.path.exists(os.path.join(path, "config.yaml")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {path!r} (expected an iter_* directory or a 'latest' file)")
    return latest


def _probe_rank(ckpt: str, data_prefix: str, batches: int) -> Dict:
    import torch
    import torch.distributed as dist

    from ..train import Trainer, TrainConfig
    from ..train.checkpoint import load_model_only
    from .probe import GradientProbe, ProbeConfig

    cfg = TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    cfg.data.train_prefix, cfg.data.valid_prefix = data_prefix, None
    cfg.checkpoint.dir, cfg.probe = None, {}
    cfg.logging.console, cfg.logging.tensorboard = False, False
    cfg.logging.dir = os.path.join(ckpt, "probe_logs")
    tokens = batches * cfg.train.global_batch_size * cfg.model.seq_length
    probe = GradientProbe(ProbeConfig(interval=1, update_interval=1, rank_interval=batches,
                                      rank_token_budget=min(tokens, 4096)))
    trainer = Trainer(cfg, probe=probe)
    load_model_only(ckpt, [m.module for m in trainer.models])
    stream = trainer._stream(trainer.train_data, 0, cfg.train.seed)
    for step in range(batches):
        probe.step = step
        for m in trainer.models:
            m.zero_grad_buffer()
        trainer._run([next(stream) for _ in range(trainer.num_micro)], forward_only=False)
    hist = probe.history
    out: Dict = {"checkpoint": ckpt, "batches": batches}
    for key in ("destroyed_ratio", "visible_cosine", "isotropic_baseline", "update_cosine", "grad_norm",
                "hidden_grad_norm"):
        vals = [h[key] for h in hist if key in h]
        if vals:
            out[key] = sum(vals) / len(vals)
    for h in hist:
        for k, v in h.items():
            if k.startswith(("numerical_rank", "effective_rank", "energy_", "components_", "eym_", "rank_")):
                out[k] = v
    probe.remove()
    return out if probe.is_reporter or not dist.is_initialized() else None


def probe_checkpoint(path: str, data_prefix: str, batches: int = 4, nproc: Optional[int] = None) -> Dict:
    """Figures of the checkpoint at ``path`` on ``data_prefix`` (run on CPU ranks of this machine)."""
    import functools

    from ..cpu import launch
    from ..train import TrainConfig

    ckpt = _resolve(path)
    cfg = TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    world = nproc or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    results = launch(functools.partial(_probe_rank, ckpt, data_prefix, batches), world, timeout=3600)
    return next(r for r in results if r is not None)
