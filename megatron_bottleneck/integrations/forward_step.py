"""A ``forward_step`` wrapper that attaches a :class:`GradientProbe` to the model it is given, for
Megatron-LM's ``forward_step(data_iterator, model, ...)`` and Megatron-Bridge's state-first
``forward_step(state, data_iterator, model, ...)`` alike.

The wrapper keeps the wrapped function's signature visible (``functools.wraps`` sets
``__wrapped__``, which ``inspect.signature`` follows), so a framework that inspects it, as
Megatron-Bridge does to decide whether to pass ``state`` first, calls it exactly as it would call
the original. The model argument is located from that same signature:

* the parameter named ``model``, wherever it is (positionally or by keyword);
* otherwise the second positional parameter when the first is named ``state`` / ``global_state`` or
  annotated ``GlobalState`` (Bridge's rule, ``needs_global_state_injection`` in
  ``megatron/bridge/training/utils/train_utils.py``), i.e. ``(state, data_iterator, model)``:
  index 2;
* otherwise index 1 (Megatron-LM's ``(data_iterator, model)``).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Tuple, Union

__all__ = ["find_model_argument", "takes_global_state", "wrap_forward_step"]

_STATE_NAMES = ("state", "global_state")


def _is_global_state_annotation(annotation) -> bool:
    # Bridge: annotation is GlobalState, a string containing "GlobalState", or named GlobalState.
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        return "GlobalState" in annotation
    return getattr(annotation, "__name__", None) == "GlobalState"


def takes_global_state(fn: Callable) -> bool:
    """Whether a Bridge-style caller would pass ``state`` first: the first parameter is named
    ``state``/``global_state``, or some parameter is annotated ``GlobalState``."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    if any(_is_global_state_annotation(p.annotation) for p in params):
        return True
    return params[0].name in _STATE_NAMES


def find_model_argument(fn: Callable) -> Tuple[Optional[int], Optional[str]]:
    """``(positional index or None, keyword name or None)`` of ``fn``'s model argument."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(params):
        if p.name == "model":
            index = positional.index(p) if p in positional else None
            name = None if p.kind == p.POSITIONAL_ONLY else "model"
            return index, name
    # No parameter named 'model': data iterator, then model (after 'state' for Bridge).
    index = 2 if takes_global_state(fn) else 1
    name = positional[index].name if index < len(positional) and \
        positional[index].kind != inspect.Parameter.POSITIONAL_ONLY else None
    return index, name


def wrap_forward_step(forward_step: Callable, probe: Union[object, Callable[[], object]],
                      num_microbatches: Optional[int] = None) -> Callable:
    """``forward_step`` that calls ``probe.watch(model, num_microbatches)`` first.

    ``probe`` is a :class:`GradientProbe` or a zero-argument callable returning one (or None to
    skip), evaluated at each call (so it can be built lazily once the framework is initialised).
    """
    index, name = find_model_argument(forward_step)
    lazy = not hasattr(probe, "watch")

    @functools.wraps(forward_step)
    def wrapped(*args, **kwargs):
        p = probe() if lazy else probe
        if p is not None:
            if name is not None and name in kwargs:
                model = kwargs[name]
            elif index is not None and index < len(args):
                model = args[index]
            else:
                model = None
            if model is not None:
                p.watch(model, num_microbatches)
        return forward_step(*args, **kwargs)

    wrapped.__megatron_bottleneck_probe__ = probe
    return wrapped
