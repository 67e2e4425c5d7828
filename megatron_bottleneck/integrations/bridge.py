"""Megatron-Bridge integration (optional dependency): the gradient probe as a Bridge callback.

    from megatron_bottleneck.integrations.bridge import ProbeCallback
    pretrain(config, forward_step, callbacks=[ProbeCallback(probe)])

``on_train_start`` attaches the probe to ``context.model`` (the DDP-wrapped chunks) and sets
``probe.step = context.state.train_state.step`` (the loaded iteration when resuming); ``on_train_step_end``
finishes the step's figures (``probe.end_step()``); ``on_train_end`` detaches it. Bridge is imported only when the class is first requested, so importing this module
does not need Bridge. For the low-rank head use Bridge's pre-wrap hooks with
``megatron_bottleneck.heads.install.low_rank_head_hook(rank)``. For the forward step use
:func:`megatron_bottleneck.integrations.forward_step.wrap_forward_step` (it keeps Bridge's
state-first detection working), not ``probe.integrations.wrap_forward_step``.

Installing Bridge 0.6.2 on CPU (Python 3.12, torch 2.14.1, megatron-core 0.19.2; measured 2026-11-30):
``pip install --no-deps megatron-bridge==0.6.2``; then ``transformers>=5.8,<=5.12.1 omegaconf einops``
and ``datasets`` with their dependencies; ``nvidia-resiliency-ext megatron-energon nvidia-modelopt``
with ``--no-deps`` (they require torch) plus their non-torch requirements (braceexpand filetype
mfusepy multi-storage-client pillow rapidyaml s3fs webdataset nvidia-ml-py pulp rich scipy
defusedxml psutil pynvml ninja). ``import megatron.bridge`` then needs two stand-ins: a stub
``transformer_engine.pytorch`` (``peft/lora_layers.py`` imports it unconditionally; installed after
megatron-core has been imported, with ``__version__ = "0.0.0"``, since a model module calls
``is_te_min_version`` at import) and ``nvidia_resiliency_ext.checkpointing.async_ckpt.core`` marked
absent (nvrx 0.4.1 has no ``__version__``; megatron-core then asserts >= 0.6.0). See
``tests/distributed/bridge_import_check.py``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ProbeCallback", "make_probe_callback_class"]

_CLASS = None


def make_probe_callback_class():
    """The ``ProbeCallback`` class, subclassing ``megatron.bridge.training.callbacks.Callback``."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from megatron.bridge.training.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            f"ProbeCallback needs Megatron-Bridge (megatron.bridge.training.callbacks): {exc}"
        ) from None

    class ProbeCallback(Callback):
        """Attach a :class:`~megatron_bottleneck.probe.GradientProbe` for a Bridge ``pretrain``."""

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

        def on_train_step_end(self, context) -> None:
            self.probe.end_step()  # the probe's one reduction and host transfer of the step

        def on_train_end(self, context) -> None:
            self.probe.remove()

    _CLASS = ProbeCallback
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "ProbeCallback":
        return make_probe_callback_class()
    raise AttributeError(name)
