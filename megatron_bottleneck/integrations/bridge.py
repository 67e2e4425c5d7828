"""Megatron-Bridge integration (optional dependency): the gradient probe as a Bridge callback.

    from megatron_bottleneck.integrations.bridge import ProbeCallback
    pretrain(config, forward_step, callbacks=[ProbeCallback(probe)])

``on_train_start`` attaches the probe to ``context.model`` (the DDP-wrapped chunks) and sets
``probe.step = context.state.train_state.step`` (the loaded iteration when resuming); ``on_train_step_start``
opens the probe's step with that step's micro-batch count (``probe.begin_step``: Megatron's
``get_num_microbatches()``, read afresh every step, after Bridge has updated it for batch-size ramp-up);
``on_train_step_end`` ends it (``probe.end_step()``: its figures); ``on_train_end`` detaches it. The probe's vocabulary is the
provider's ``vocab_size`` (the tokenizer's, not the padded one). Bridge is imported only when the class is first
requested, so importing this module does not need Bridge. For the low-rank head and the fused loss use Bridge's
pre-wrap hooks: ``config.model.register_pre_wrap_hook(mb.low_rank_head_hook(rank))`` and
``config.model.register_pre_wrap_hook(mb.fused_loss_hook())``. For the forward step use
:func:`megatron_bottleneck.integrations.forward_step.wrap_forward_step` (it keeps Bridge's
state-first detection working), not ``probe.integrations.wrap_forward_step``.

Installing Bridge 0.6.2 without Transformer Engine (CPU; README "Megatron-Bridge"): ``pip install --no-deps
megatron-bridge==0.6.2`` and its pure-Python dependencies (``nvidia-resiliency-ext`` resolves to 0.4.1 on Python
3.12, which has no ``__version__`` and breaks ``import megatron.core``: call :func:`mark_old_nvrx_absent` first).
:func:`prepare_bridge_import` then makes
``import megatron.bridge`` work without TE: :func:`megatron_bottleneck.enable_cpu_mode` calls it (before applying
its Bridge patches, :mod:`.bridge_cpu`) and so does ``ProbeCallback``; otherwise call it before importing Bridge.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any

from packaging.version import Version

__all__ = ["ProbeCallback", "make_probe_callback_class", "prepare_bridge_import", "mark_old_nvrx_absent"]

_NVRX_ASYNC = "nvidia_resiliency_ext.checkpointing.async_ckpt.core"


class _AnyClass(type):
    """Stands in for any Transformer Engine class: attributes are further stand-ins, nothing is an instance."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyClass(name, (), {})


def _te_stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _AnyClass(attr, (), {})

    module.__getattr__ = __getattr__
    module.__version__ = "0.0.0"
    return module


def _old_nvrx() -> bool:
    """nvidia-resiliency-ext < 0.7 (0.4.1 has no ``__version__``, which megatron-core's async checkpointing reads)."""
    try:
        version = importlib.metadata.version("nvidia-resiliency-ext")
    except importlib.metadata.PackageNotFoundError:
        return False
    return Version(version) < Version("0.7")


def _findable(name: str) -> bool:
    """Whether ``name`` is installed (a module put into ``sys.modules`` by hand, with no spec, counts as not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def mark_old_nvrx_absent() -> None:
    """With nvidia-resiliency-ext < 0.7 installed (0.4.1 is what Bridge's requirements bring on Python 3.12), mark
    its async-checkpoint module absent, as megatron-core expects of a missing one: 0.4.1 has no ``__version__``,
    and megatron-core reading it breaks ``import megatron.core``. Needed before megatron-core is first imported:
    our entry points call it first (the ``megatron-bottleneck`` command, ``python -m megatron_bottleneck.megatron_lm``,
    :func:`~megatron_bottleneck.launch`'s fork server, :func:`prepare_bridge_import`); a script of your own calls
    it before importing megatron-core (importing this module does not import megatron-core). Nothing changes at
    import of any of our modules."""
    if _NVRX_ASYNC not in sys.modules and _old_nvrx():
        sys.modules[_NVRX_ASYNC] = None


def prepare_bridge_import() -> None:
    """Make ``import megatron.bridge`` (0.6.2) work without Transformer Engine; idempotent, a no-op with TE.

    * Bridge's ``peft/lora_layers.py`` imports ``transformer_engine.pytorch`` unconditionally (for LoRA's TE
      paths only): when TE is not installed, a stand-in module is present *only while Bridge imports* (after
      megatron-core's TE checks have run), then removed, so ``import transformer_engine`` still fails afterwards.
    * nvidia-resiliency-ext older than 0.7 (no ``__version__``): :func:`mark_old_nvrx_absent` (effective only
      before megatron-core is first imported).
    """
    mark_old_nvrx_absent()
    if "megatron.bridge.peft.lora_layers" in sys.modules or _findable("transformer_engine"):
        return
    for name in ("megatron.core", "megatron.core.tensor_parallel", "megatron.core.transformer",
                 "megatron.core.models.gpt", "megatron.core.extensions"):
        try:  # megatron-core decides "no Transformer Engine" before the stand-in exists
            importlib.import_module(name)
        except ImportError:
            pass
    te, te_pytorch = _te_stand_in("transformer_engine"), _te_stand_in("transformer_engine.pytorch")
    te.pytorch = te_pytorch
    sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te_pytorch
    try:
        importlib.import_module("megatron.bridge")
        importlib.import_module("megatron.bridge.peft.lora_layers")
        importlib.import_module("megatron.bridge.training.pretrain")
    finally:
        for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
            if isinstance(sys.modules[name], types.ModuleType) and getattr(sys.modules[name], "__file__", None) is None:
                del sys.modules[name]


def make_probe_callback_class():
    """The ``ProbeCallback`` class, subclassing ``megatron.bridge.training.callbacks.Callback``: made at the first
    call, then found among ``Callback.__subclasses__()`` (Python's own record; no cache of ours)."""
    try:
        if _findable("megatron.bridge"):
            prepare_bridge_import()
        from megatron.bridge.training.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            f"ProbeCallback needs Megatron-Bridge (megatron.bridge.training.callbacks): {exc}"
        ) from None
    for sub in Callback.__subclasses__():
        if sub.__module__ == __name__ and sub.__name__ == "ProbeCallback":
            return sub

    class ProbeCallback(Callback):
        """Attach a :class:`~megatron_bottleneck.probe.GradientProbe` for a Bridge ``pretrain``.

        ``num_microbatches``: every step's micro-batch count, for a run without Megatron's num-microbatches
        calculator; None (default): the calculator's count, read at the start of each step."""

        def __init__(self, probe, num_microbatches=None):
            self.probe = probe
            self.num_microbatches = num_microbatches

        def on_train_start(self, context) -> None:
            state = getattr(context, "state", None)
            train_state = getattr(state, "train_state", None)
            if train_state is not None and getattr(train_state, "step", None) is not None:
                self.probe.step = int(train_state.step)
            # Bridge's model provider holds the tokenizer's vocabulary; it pads a copy for the model.
            vocab = getattr(getattr(getattr(state, "cfg", None), "model", None), "vocab_size", None)
            if self.probe.config.vocab_size is None and isinstance(vocab, int):
                self.probe.config.vocab_size = vocab
            self.probe.watch(context.model, self.num_microbatches)

        def on_train_step_start(self, context) -> None:
            self.probe.begin_step(self.num_microbatches)  # None: get_num_microbatches() of this step

        def on_train_step_end(self, context) -> None:
            self.probe.end_step()  # the probe's one reduction and host transfer of the step

        def on_train_end(self, context) -> None:
            self.probe.remove()

    return ProbeCallback


def __getattr__(name: str) -> Any:
    if name == "ProbeCallback":
        return make_probe_callback_class()
    raise AttributeError(name)
