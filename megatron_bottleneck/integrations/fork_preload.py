"""What :func:`~megatron_bottleneck.integrations.launch.launch`'s fork server imports once, before it forks
ranks: torch and the Megatron-Core modules every rank needs. Importing this package first applies its
import-time guards (``mark_old_nvrx_absent``: nvidia-resiliency-ext 0.4.1, which Megatron-Bridge brings on
Python 3.12, breaks megatron-core's import). Each import is guarded: a module that fails here (not installed,
or raising) is left to the rank, which imports it itself and reports its error as any other."""
import importlib

MODULES = ("torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
           "megatron.core.distributed", "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel")

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 (see the module docstring)
        pass
