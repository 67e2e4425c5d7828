"""Where figures go: JSONL always, TensorBoard and Weights & Biases when available.

One :class:`MetricsLogger` per log file; only the rank that reports calls it. Each record is a flat
``{name: value}`` at a step; names are grouped (``probe/destroyed_ratio``) for TensorBoard and W&B. A
missing optional package (tensorboard, wandb) gives one warning and the JSONL still gets every record.
Writers the caller already has (Megatron-LM's own TensorBoard writer or W&B module) can be passed in.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, Optional

__all__ = ["MetricsLogger", "read_jsonl"]



def _warn_once(message: str) -> None:
    """A RuntimeWarning; Python's warning filter (action "default") shows a given message once per calling
    location, so ``message`` names no path: no registry of ours."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class MetricsLogger:
    """Writes records to ``<log_dir>/<jsonl_name>`` and, when available, TensorBoard and W&B.

    ``tensorboard=True`` writes ``<log_dir>/tensorboard`` when the ``tensorboard`` package imports;
    ``wandb_project`` starts a W&B run when ``wandb`` imports. ``tb_writer`` (a ``SummaryWriter``) and
    ``wandb_run`` (anything with ``.log(dict, step=)``) are used instead of opening new ones; they are not
    closed by :meth:`close`.
    """

    def __init__(
        self,
        log_dir: str,
        jsonl_name: str = "probe.jsonl",
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        wandb_run_name: Optional[str] = None,
        tb_writer=None,
        wandb_run=None,
    ):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.path = os.path.join(log_dir, jsonl_name)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb, self._wandb = tb_writer, wandb_run
        self._owns_tb, self._owns_wandb = tb_writer is None, wandb_run is None
        if tensorboard and self._tb is None:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _warn_once("TensorBoard logging is off: the tensorboard package is not installed "
                           "(pip install tensorboard); figures still go to the JSONL file.")
            else:
                self._tb = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
        if wandb_project and self._wandb is None:
            try:  # optional dependency
                import wandb
            except ImportError:
                _warn_once("W&B logging is off: the wandb package is not installed (pip install wandb); "
                           "figures still go to the JSONL file.")
            else:
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
        if self._tb is not None and self._owns_tb:
            self._tb.close()
        if self._wandb is not None and self._owns_wandb:
            self._wandb.finish()


def read_jsonl(path: str):
    """All records of a JSONL log (None stands for a non-finite value)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
