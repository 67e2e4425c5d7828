"""A Lightning ``Callback`` running the :class:`GradientProbe` (needs ``pip install lightning``)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

try:  # optional dependency
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("ProbeCallback needs Lightning: pip install lightning") from exc

from ..base.errors import ConfigError
from ..base.head import find_head
from ..probe import GradientProbe, ProbeConfig

__all__ = ["ProbeCallback"]


class ProbeCallback(Callback):
    """Measure the head's gradient bottleneck in a Lightning (or NeMo-style) training run.

    ``head`` is the head module, a callable ``(pl_module) -> module``, or None to find the ``output_layer``
    (Megatron language models) inside the LightningModule.
    """

    def __init__(self, config: Optional[ProbeConfig] = None,
                 head: Union[None, torch.nn.Module, Callable] = None, **overrides):
        self.probe = GradientProbe(config, **overrides)
        self._head = head

    def on_fit_start(self, trainer, pl_module):
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if isinstance(self._head, torch.nn.Module):
            head = self._head
        elif callable(self._head):
            head = self._head(pl_module)
        else:
            head = find_head(pl_module)
        if head is None:
            raise ConfigError("ProbeCallback found no head: pass head=<module> or head=lambda m: m.<head>.")
        self.probe.watch_head(head, accumulate)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.probe.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.probe.end_step()  # a no-op until an optimizer step's micro-batches are all done

    def on_fit_end(self, trainer, pl_module):
        self.probe.remove()
