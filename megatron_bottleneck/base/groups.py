"""Process groups: their size and rank, and the defaults (an explicit group wins, else Megatron's parallel state,
else none).

:func:`group_size` / :func:`group_rank` are the one way to size a group below the integrations (torch only, as
``megatron.core.utils.get_pg_size`` / ``get_pg_rank``, which the Megatron-facing modules use): 1 and 0 for no group
or without an initialised ``torch.distributed``.
"""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["group_size", "group_rank", "default_tp_group", "default_dp_group", "default_dp_cp_group"]


def group_size(group) -> int:
    """Ranks in ``group`` (1 for None, or without an initialised torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 for None, or without an initialised torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _parallel_state():
    # Function-level import: keeps the base importable without megatron-core (torch only).
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    return parallel_state if parallel_state.model_parallel_is_initialized() else None


def default_tp_group(group=None):
    """``group`` if given, else Megatron's tensor-parallel group when initialised, else None (one rank)."""
    if group is not None:
        return group
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_group() if ps is not None else None


def default_dp_group(group=None):
    """``group`` if given, else Megatron's data-parallel group when initialised, else None (one rank)."""
    if group is not None:
        return group
    ps = _parallel_state()
    return ps.get_data_parallel_group() if ps is not None else None


def default_dp_cp_group(group=None):
    """``group`` if given, else Megatron's data x context parallel group when initialised, else None: the
    ranks that hold different tokens of the same model replica's batch (one of them reports figures)."""
    if group is not None:
        return group
    ps = _parallel_state()
    return ps.get_data_parallel_group(with_context_parallel=True) if ps is not None else None
