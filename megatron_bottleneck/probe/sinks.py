"""Where probe (and trainer) figures go: JSONL, TensorBoard, Weights & Biases.

One :class:`MetricsLogger` per run; only the rank that reports calls it. Each record is a flat
``{name: float}`` at a step; names are grouped (``probe/destroyed_ratio``) for TensorBoard and W&B.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional


class MetricsLogger:
    """Writes records to ``<log_dir>/<jsonl_name>`` and, when available, TensorBoard and W&B.

    ``tensorboard=True`` needs the ``tensorboard`` package (``pip install tensorboard``); ``wandb``
    is used when ``wandb_project`` is set and the package imports.
    """

    def __init__(
        self,
        log_dir: str,
        jsonl_name: str = "probe.jsonl",
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        wandb_run_name: Optional[str] = None,
    ):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, jsonl_name)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard not installed
                raise ImportError(
                    "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                    "(or pass tensorboard=False)."
                ) from exc
            self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self._wandb = wandb.init(project=wandb_project, name=wandb_run_name, reinit=True)

    def log(self, step: int, record: Dict, prefix: str = "") -> None:
        """JSONL gets every value (non-finite floats as null, lists kept); TensorBoard and W&B
        get the scalars."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps({"step": step, **{prefix + k: v for k, v in clean.items()}}) + "\n")
        self._file.flush()
        scalars = {prefix + k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: str):
    """All records of a JSONL log (None stands for a non-finite value)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
