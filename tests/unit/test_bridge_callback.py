"""ProbeCallback against a stand-in for megatron.bridge.training.callbacks (Bridge not needed)."""
import sys
import types

import pytest


@pytest.fixture
def fake_bridge(monkeypatch):
    class Callback:  # Bridge's base class: every event a no-op
        def on_train_start(self, context):
            pass

        def on_train_end(self, context):
            pass

    mods = {}
    for name in ("megatron.bridge", "megatron.bridge.training", "megatron.bridge.training.callbacks"):
        mods[name] = types.ModuleType(name)
    mods["megatron.bridge.training.callbacks"].Callback = Callback
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    import megatron_bottleneck.integrations.bridge as bridge

    monkeypatch.setattr(bridge, "_CLASS", None)
    yield Callback
    bridge._CLASS = None


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
