"""Integrations over heads and probe: CPU mode, local launch, Megatron parallel state, the schedule
driver, forward-step wrapping, Lightning (import ``.lightning`` yourself: it needs the package)."""
from .bridge import mark_old_nvrx_absent

mark_old_nvrx_absent()  # before megatron-core's first import: nvidia-resiliency-ext 0.4.1 breaks it
from .cpu import cpu_mode, cpu_mode_patches, disable_cpu_mode, enable_cpu_mode, is_cpu_mode
from .forward_step import wrap_forward_step
from .launch import free_port, launch
from .parallel import destroy_parallel, initialize_parallel
from .schedule import StepResult, forward_backward, gpt_forward_step

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_cpu_mode", "cpu_mode_patches",
           "wrap_forward_step", "launch", "free_port", "initialize_parallel",
           "destroy_parallel", "forward_backward", "gpt_forward_step", "StepResult"]
