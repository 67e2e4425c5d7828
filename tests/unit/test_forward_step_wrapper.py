"""The signature-aware forward_step wrapper (megatron_bottleneck.integrations.forward_step).

Megatron-Bridge decides whether to pass ``state`` first by inspecting the forward_step's signature
(``needs_global_state_injection`` in Megatron-Bridge's
``src/megatron/bridge/training/utils/train_utils.py``, NVIDIA-NeMo/Megatron-Bridge): True when any
parameter is annotated ``GlobalState`` (the class, a string containing "GlobalState", or an object
named GlobalState), else when the first parameter is named ``state`` or ``global_state``; then it
calls ``functools.partial(forward_step, state)``. ``bridge_call`` below re-implements that rule so
this test runs without Bridge.
"""
from __future__ import annotations

import functools
import inspect

import pytest

from megatron_bottleneck.integrations.forward_step import (
    find_model_argument,
    takes_global_state,
    wrap_forward_step,
)


class GlobalState:  # stands in for megatron.bridge.training.state.GlobalState
    pass


def bridge_needs_state(fn) -> bool:
    params = inspect.signature(fn).parameters
    for p in params.values():
        a = p.annotation
        if a is not inspect.Parameter.empty and (
            a is GlobalState or (isinstance(a, str) and "GlobalState" in a)
            or getattr(a, "__name__", None) == "GlobalState"
        ):
            return True
    names = list(params)
    return bool(names) and names[0] in ("state", "global_state")


def bridge_call(fn, state, data_iterator, model):
    f = functools.partial(fn, state) if bridge_needs_state(fn) else fn
    return f(data_iterator, model)


class FakeProbe:
    def __init__(self):
        self.watched = []

    def watch(self, model, num_microbatches=None):
        self.watched.append(model)
        return self


def fs_megatron(data_iterator, model, return_schedule_plan: bool = False):
    return ("megatron", data_iterator, model)


def fs_state(state, data_iterator, model, return_schedule_plan=False):
    return ("state", state, data_iterator, model)


def fs_global_state(global_state, data_iterator, model):
    return ("global_state", global_state, data_iterator, model)


def fs_annotated(st: GlobalState, it, net):
    return ("annotated", st, it, net)


def fs_annotated_str(st: "GlobalState", it, net):
    return ("annotated_str", st, it, net)


def fs_plain(it, net):
    return ("plain", it, net)


def fs_model_kw(it, *, model):
    return ("kw", it, model)


@pytest.mark.parametrize("fn", [fs_megatron, fs_state, fs_global_state, fs_annotated, fs_annotated_str,
                                fs_plain])
def test_bridge_call_watches_the_model_and_keeps_state_injection(fn):
    probe = FakeProbe()
    wrapped = wrap_forward_step(fn, probe)
    # the wrapper is seen by Bridge exactly as the original is
    assert bridge_needs_state(wrapped) == bridge_needs_state(fn) == takes_global_state(fn)
    state, it, model = GlobalState(), iter([1]), object()
    assert bridge_call(wrapped, state, it, model) == bridge_call(fn, state, it, model)
    assert probe.watched == [model]


def test_megatron_lm_call_with_keyword_model():
    probe = FakeProbe()
    model = object()
    wrapped = wrap_forward_step(fs_megatron, probe)
    assert wrapped(iter([]), model=model)[2] is model
    assert probe.watched == [model]


def test_keyword_only_model_and_indices():
    assert find_model_argument(fs_megatron) == (1, "model")
    assert find_model_argument(fs_state) == (2, "model")
    assert find_model_argument(fs_annotated) == (2, "net")
    assert find_model_argument(fs_plain) == (1, "net")
    assert find_model_argument(fs_model_kw) == (None, "model")
    probe, model = FakeProbe(), object()
    assert wrap_forward_step(fs_model_kw, probe)(iter([]), model=model)[2] is model
    assert probe.watched == [model]


def test_lazy_probe_factory_and_none():
    made = []

    def factory():
        made.append(1)
        return None  # probe off: the wrapper only forwards

    model = object()
    assert wrap_forward_step(fs_megatron, factory)(None, model) == ("megatron", None, model)
    assert made == [1]
