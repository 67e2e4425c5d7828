"""A Lightning ``Callback`` running the :class:`GradientProbe` (needs ``pip install lightning``)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("ProbeCallback needs Lightning: pip install lightning") from exc

from .probe import GradientProbe, ProbeConfig


class ProbeCallback(Callback):
    """Measure the head's gradient bottleneck in a Lightning (or NeMo-style) training run.

    ``head`` is the head module, a callable ``(pl_module) -> module``, or None to look for an
    ``output_layer`` (Megatron language models) inside the LightningModule.
    """

    def __init__(self, config: Optional[ProbeConfig] = None,
                 head: Union[None, torch.nn.Module, Callable] = None, **overrides):
        self.probe = GradientProbe(config, **overrides)
        self._head = head

    def on_fit_start(self, trainer, pl_module):
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        find = callable(self._head) and not isinstance(self._head, torch.nn.Module)
        head = self._head(pl_module) if find else self._head
        if head is None:
            self.probe.watch(pl_module, accumulate)
            if self.probe._head is None:
                for module in pl_module.modules():
                    if hasattr(module, "output_layer"):
                        self.probe.watch(module, accumulate)
                        break
        else:
            self.probe.watch_head(head, accumulate)
        if self.probe._head is None:
            raise ValueError("ProbeCallback found no head: pass head=<module> or head=lambda m: m.<head>.")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.probe.step = trainer.global_step

    def on_fit_end(self, trainer, pl_module):
        self.probe.remove()
