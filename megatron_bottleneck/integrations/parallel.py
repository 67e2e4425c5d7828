"""Megatron parallel-state set-up shared by the trainer, the tests and the examples."""
from __future__ import annotations

from typing import Optional

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
    parallel_state.destroy_model_parallel()
