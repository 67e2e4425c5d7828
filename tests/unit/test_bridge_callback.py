"""ProbeCallback against a stand-in for megatron.bridge.training.callbacks (Bridge not needed)."""
import inspect
import sys
import types

import pytest
import torch


@pytest.fixture
def fake_bridge(monkeypatch):
    class Callback:  # Bridge's base class: every event a no-op
        def on_train_start(self, context):
            pass

        def on_train_end(self, context):
            pass

        def on_train_step_start(self, context):
            pass

        def on_train_step_end(self, context):
            pass

    mods = {}
    for name in ("megatron.bridge", "megatron.bridge.training", "megatron.bridge.training.callbacks"):
        mods[name] = types.ModuleType(name)
    mods["megatron.bridge.training.callbacks"].Callback = Callback
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield Callback  # ProbeCallback is looked up among this Callback's subclasses: a fresh class per fake Bridge


def test_probe_callback_attaches_and_continues_step(fake_bridge):
    from megatron_bottleneck.integrations.bridge import ProbeCallback

    assert issubclass(ProbeCallback, fake_bridge)

    class Probe:
        step = 0
        watched = removed = None
        config = types.SimpleNamespace(vocab_size=None)

        def watch(self, model, n=None):
            self.watched = model

        def remove(self):
            self.removed = True

    probe, model = Probe(), [object()]
    state = types.SimpleNamespace(train_state=types.SimpleNamespace(step=42),
                                  cfg=types.SimpleNamespace(model=types.SimpleNamespace(vocab_size=49152)))
    ctx = types.SimpleNamespace(model=model, state=state)
    cb = ProbeCallback(probe)
    cb.on_train_start(ctx)
    assert probe.watched is model and probe.step == 42
    assert probe.config.vocab_size == 49152  # the provider's (unpadded) vocabulary
    cb.on_train_end(ctx)
    assert probe.removed


def test_batch_size_rampup_gives_each_step_its_own_micro_batches(fake_bridge, megatron_one_rank):
    """Megatron's ramp-up calculator (rampup_batch_size [1, 1, 2], global batch 3, micro-batch 1; megatron-core 0.19:
    the step schedule "0:1 1:2 3:3") gives steps of
    1, 2 and 3 micro-batches; the callback opens each probe step with get_num_microbatches() of that step, so each
    record covers exactly that step's micro-batches (the last step's forwards all run before its backwards): its
    grad_norm, hidden_grad_norm and destroyed_ratio equal the float64 brute force of that step's logit gradient
    G = (softmax(h W^T) - onehot(y)) / (n T). (Before, the count read once at the start, 1, cut every micro-batch
    into a step of its own.)"""
    from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                           get_num_microbatches, init_num_microbatches_calculator,
                                                           update_num_microbatches)

    import megatron_bottleneck as mb
    from megatron_bottleneck.integrations.bridge import ProbeCallback

    T, D, V = 6, 5, 23
    gen = torch.Generator().manual_seed(3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output_layer = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)

    model = Model()
    with torch.no_grad():
        model.output_layer.weight.copy_(torch.randn(V, D, generator=gen, dtype=torch.float64) * 2)
    W = model.output_layer.weight.detach()
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1))
    state = types.SimpleNamespace(train_state=types.SimpleNamespace(step=5),
                                  cfg=types.SimpleNamespace(model=types.SimpleNamespace(vocab_size=V)))
    ctx = types.SimpleNamespace(model=[model], state=state)
    cb = ProbeCallback(probe)
    if "step_batch_size_schedule" in inspect.signature(init_num_microbatches_calculator).parameters:
        init_num_microbatches_calculator(0, None, 3, 1, 1, step_batch_size_schedule="0:1 1:2 3:3")  # >= 0.19
    else:
        init_num_microbatches_calculator(0, [1, 1, 2], 3, 1, 1)  # rampup_batch_size (ignored from 0.19 on)
    try:
        cb.on_train_start(ctx)
        consumed, wants = 0, []
        for step in range(3):
            update_num_microbatches(consumed, consistency_check=True)
            n = get_num_microbatches()
            assert n == step + 1
            hs = [torch.randn(T, D, generator=gen, dtype=torch.float64) for _ in range(n)]
            ys = [torch.randint(0, V, (T,), generator=gen) for _ in range(n)]
            cb.on_train_step_start(ctx)
            losses = []
            for h, y in zip(hs, ys):
                x = h.clone().requires_grad_(True)
                losses.append(torch.nn.functional.cross_entropy(model.output_layer(x), y) / n)
                if step < 2:
                    losses.pop().backward()
            for loss in losses:  # the last step: every forward before the first backward
                loss.backward()
            cb.on_train_step_end(ctx)
            consumed += n
            h, y = torch.cat(hs), torch.cat(ys)
            G = (torch.softmax(h @ W.t(), -1) - torch.nn.functional.one_hot(y, V)) / (n * T)
            Q = torch.linalg.qr(W)[0]
            wants.append({"grad_norm": G.norm().item(), "hidden_grad_norm": (G @ W).norm().item(),
                          "destroyed_ratio": ((G - G @ Q @ Q.t()).norm() / G.norm()).item()})
        cb.on_train_end(ctx)
    finally:
        destroy_num_microbatches_calculator()
    assert probe.last_error is None
    assert [r["step"] for r in probe.history] == [5, 6, 7]
    for got, want in zip(probe.history, wants):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6), (got["step"], key)  # the head view is float32
