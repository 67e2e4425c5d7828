"""Check ProbeCallback and the forward_step wrapper against a real Megatron-Bridge install (CPU).

Bridge 0.6.2 cannot be pip-installed normally on CPU (see the module docstring of
megatron_bottleneck/integrations/bridge.py); with its packages on PYTHONPATH, run:

    PYTHONPATH=<repo>:<bridge and deps dirs> python tests/distributed/bridge_import_check.py

Two stand-ins are needed to import Bridge without Transformer Engine and with nvidia-resiliency-ext
0.4.1; both are set up here, after megatron-core has decided that TE is absent.
"""
import sys
import types

sys.modules["nvidia_resiliency_ext.checkpointing.async_ckpt.core"] = None  # nvrx 0.4.1: no async ckpt
import megatron.core  # noqa: E402,F401  (decides "no TE" before the stub exists)
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
import megatron.core.transformer  # noqa: E402,F401


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})


def _stub(name):
    m = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Meta(attr, (), {})

    m.__getattr__ = __getattr__
    return m


te, tep = _stub("transformer_engine"), _stub("transformer_engine.pytorch")
te.pytorch, te.__version__ = tep, "0.0.0"
sys.modules.setdefault("transformer_engine", te)  # Bridge's peft/lora_layers.py imports it unconditionally
sys.modules.setdefault("transformer_engine.pytorch", tep)

import megatron.bridge.training.callbacks as cb  # noqa: E402
from megatron.bridge.training.utils.train_utils import needs_global_state_injection  # noqa: E402

from megatron_bottleneck.integrations.bridge import ProbeCallback  # noqa: E402
from megatron_bottleneck.integrations.forward_step import wrap_forward_step  # noqa: E402


class _Probe:
    step = 0
    watched = None

    def watch(self, model, n=None):
        self.watched = model

    def remove(self):
        pass


probe = _Probe()
assert issubclass(ProbeCallback, cb.Callback)
manager = cb.CallbackManager()
manager.add([ProbeCallback(probe)])
assert manager.has_callbacks("on_train_start") and manager.has_callbacks("on_train_end")
ctx = cb.CallbackContext(state=types.SimpleNamespace(train_state=types.SimpleNamespace(step=7)), model=["chunk"])
manager.fire("on_train_start", ctx)
assert probe.step == 7 and probe.watched == ["chunk"]


def forward_step(state, data_iterator, model):
    return model


wrapped = wrap_forward_step(forward_step, probe)
assert needs_global_state_injection(wrapped) is True
assert needs_global_state_injection(wrap_forward_step(lambda data_iterator, model: model, probe)) is False
print("bridge import check: OK", cb.__file__)
