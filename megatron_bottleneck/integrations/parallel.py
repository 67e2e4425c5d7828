"""Megatron parallel-state set-up shared by the trainer, the tests and the examples."""
from __future__ import annotations

import gc
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from ..base.errors import ConfigError

__all__ = ["initialize_parallel", "destroy_parallel"]


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
) -> None:
    """Initialise Megatron's model-parallel groups and RNG tracker on an initialised process group.

    The world size must be a multiple of ``tensor_model_parallel_size * pipeline_model_parallel_size``;
    the rest is data parallel. Seeds torch's CPU generator with ``seed + 100 * pp_rank`` (as
    Megatron-LM does) and Megatron's model-parallel RNG tracker with ``seed``.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(or run under megatron_bottleneck.launch / torchrun)."
        )
    world = torch.distributed.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1 or world % mp:
        raise ConfigError(
            f"world size {world} is not a multiple of tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}); change the parallel sizes or the number of ranks."
        )
    if parallel_state.model_parallel_is_initialized():
        destroy_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def megatron_groups() -> List["torch.distributed.ProcessGroup"]:
    """The process groups Megatron's parallel state holds (every group it made that this rank belongs to; not
    the default group), read from ``megatron.core.parallel_state``'s module attributes."""
    world = torch.distributed.group.WORLD
    found: Dict[int, torch.distributed.ProcessGroup] = {}
    for value in list(vars(parallel_state).values()):
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for group in items:
            if isinstance(group, torch.distributed.ProcessGroup) and group is not world:
                found[id(group)] = group
    return list(found.values())


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state and destroy the process groups it made (the default group stays).

    Megatron's ``destroy_model_parallel`` only forgets its groups: every gloo group keeps two threads per rank
    (and NCCL its communicators), so a process that builds parallel state again and again (a sweep running runs
    one after another, a test loop) would accumulate them: 450 idle gloo threads after 22 zoo runs, measured."""
    groups = megatron_groups()
    parallel_state.destroy_model_parallel()
    for group in groups:
        try:
            torch.distributed.destroy_process_group(group)
        except (ValueError, RuntimeError):  # already destroyed (a group Megatron holds under two names)
            pass
    del groups
    gc.collect()  # a destroyed group sits in reference cycles: its threads end when it is collected
