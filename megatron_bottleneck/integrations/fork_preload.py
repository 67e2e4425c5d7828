"""What :func:`~megatron_bottleneck.integrations.launch.launch`'s fork server imports once, before it forks
ranks: torch and the Megatron-Core modules every rank needs. The fork server's process starts here, so this is
where it first calls :func:`~megatron_bottleneck.integrations.bridge.mark_old_nvrx_absent` (nvidia-resiliency-ext
0.4.1, which Megatron-Bridge brings on Python 3.12, breaks megatron-core's import), before megatron-core's first
import. Each import is guarded: a module that fails here (not installed, or raising) is left to the rank, which
imports it itself and reports its error as any other."""
import importlib

from megatron_bottleneck.integrations.bridge import mark_old_nvrx_absent

MODULES = ("torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
           "megatron.core.distributed", "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel")


def preload() -> None:
    """The fork server's imports (see the module docstring)."""
    mark_old_nvrx_absent()
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (see the module docstring)
            pass


preload()
