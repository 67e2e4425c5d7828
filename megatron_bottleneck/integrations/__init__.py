"""Integrations over heads and probe: CPU mode, local launch, Megatron parallel state, the schedule
driver, forward-step wrapping, Lightning (import ``.lightning`` yourself: it needs the package).

The names below load on first use (PEP 562), so ``import megatron_bottleneck.integrations.bridge`` does not import
megatron-core: :func:`~.bridge.mark_old_nvrx_absent` can then be called before megatron-core's first import.
Importing this package changes nothing in ``sys.modules`` beyond its own modules."""
import importlib

_LAZY = {"enable_cpu_mode": "cpu", "disable_cpu_mode": "cpu", "cpu_mode": "cpu", "is_cpu_mode": "cpu",
         "cpu_mode_patches": "cpu", "wrap_forward_step": "forward_step", "launch": "launch", "free_port": "launch",
         "initialize_parallel": "parallel", "destroy_parallel": "parallel", "forward_backward": "schedule",
         "gpt_forward_step": "schedule", "StepResult": "schedule"}

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_cpu_mode", "cpu_mode_patches",
           "wrap_forward_step", "launch", "free_port", "initialize_parallel",
           "destroy_parallel", "forward_backward", "gpt_forward_step", "StepResult"]


_SUBMODULES = ("bridge", "bridge_cpu", "cpu", "fork_preload", "forward_step", "launch", "lightning", "megatron_lm",
               "megatron_training_cpu", "parallel", "patching", "schedule")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | set(globals()))
