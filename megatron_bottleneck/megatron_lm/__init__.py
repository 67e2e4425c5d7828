"""``import megatron_bottleneck.megatron_lm as mbl``: the Megatron-LM entry point.

Re-exports :mod:`megatron_bottleneck.integrations.megatron_lm` (loaded at the first name asked for, so that
``python -m megatron_bottleneck.megatron_lm`` can call
:func:`~megatron_bottleneck.integrations.bridge.mark_old_nvrx_absent` before megatron-core's first import);
``python -m megatron_bottleneck.megatron_lm pretrain_gpt.py <args>`` runs an unchanged training script with the
head and probe.
"""
import importlib


def __getattr__(name: str):
    if name.startswith("__") and name != "__all__":
        raise AttributeError(name)
    module = importlib.import_module("megatron_bottleneck.integrations.megatron_lm")
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(__getattr__("__all__")) | {"USAGE"})
