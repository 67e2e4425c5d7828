"""Attach a :class:`~megatron_bottleneck.probe.GradientProbe` from a Megatron ``forward_step``.

Add ``probe.watch(model)`` as the first line of your ``forward_step``, or wrap it::

    forward_step = wrap_forward_step(forward_step, probe)

The wrapper keeps the wrapped function's signature (``functools.wraps``), so loops that inspect it still
see what they expect: Megatron-Bridge passes its ``GlobalState`` first to a forward step whose first
parameter is named ``state``/``global_state`` or annotated ``GlobalState``; the wrapper then finds the
model in the second position (or the ``model`` keyword) instead of watching the data iterator.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

__all__ = ["wrap_forward_step"]

_STATE_NAMES = ("state", "global_state")


def _model_index(forward_step: Callable) -> int:
    """Position of the model argument: ``(data_iterator, model)`` -> 1; Bridge's state-first
    ``(state, data_iterator, model)`` -> 2; a parameter named ``model`` wins."""
    try:
        params = list(inspect.signature(forward_step).parameters.values())
    except (TypeError, ValueError):  # builtins / C callables: Megatron's plain contract
        return 1
    names = [p.name for p in params]
    if "model" in names:
        return names.index("model")
    first = params[0] if params else None
    if first is not None and (first.name in _STATE_NAMES or "GlobalState" in str(first.annotation)):
        return 2
    return 1


def wrap_forward_step(forward_step: Callable, probe, num_microbatches: Optional[int] = None) -> Callable:
    """``forward_step`` that attaches ``probe`` to the model it is given, then runs as before.

    Works for Megatron's ``(data_iterator, model)`` and Megatron-Bridge's ``(state, data_iterator, model)``
    forward steps (see the module docstring).
    """
    index = _model_index(forward_step)

    @functools.wraps(forward_step)
    def wrapped(*args, **kwargs):
        model = kwargs["model"] if "model" in kwargs else args[index]
        probe.watch(model, num_microbatches)
        return forward_step(*args, **kwargs)

    return wrapped
