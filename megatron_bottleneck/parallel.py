"""Megatron parallel-state set-up shared by the trainer, the tests and the examples."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["initialize_parallel", "destroy_parallel", "group_size", "group_rank"]


def group_size(group) -> int:
    """Size of ``group``; 1 when there is no group or torch.distributed is not initialised."""
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group``; 0 when there is no group or torch.distributed is not initialised."""
    if group is None or not torch.distributed.is_initialized():
        return 0
    return torch.distributed.get_rank(group)


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
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group first "
            "(or run under megatron_bottleneck.cpu.launch / torchrun)."
        )
    world = torch.distributed.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1 or world % mp:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}); change the parallel sizes or the number of ranks."
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state (the process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
