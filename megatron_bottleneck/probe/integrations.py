"""Ways to attach a :class:`GradientProbe` to a training loop; all use the same probe and math.

* Megatron-Core / Megatron-LM ``forward_step``: add ``probe.watch(model)`` as its first line, or wrap
  it: ``forward_step = wrap_forward_step(forward_step, probe)``.
* The project's trainer: ``Trainer(config, probe=probe)``.
* Lightning: :class:`megatron_bottleneck.probe.lightning.ProbeCallback`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from .probe import GradientProbe


def wrap_forward_step(forward_step: Callable, probe: GradientProbe,
                      num_microbatches: Optional[int] = None) -> Callable:
    """``forward_step(data_iterator, model, ...)`` that attaches ``probe`` to ``model`` first."""

    @functools.wraps(forward_step)
    def wrapped(data_iterator, model, *args, **kwargs):
        probe.watch(model, num_microbatches)
        return forward_step(data_iterator, model, *args, **kwargs)

    return wrapped
