"""Process-group helpers of :mod:`.linear_cross_entropy` (no group, or torch.distributed not initialised: size 1)."""
from __future__ import annotations

import torch.distributed as dist


def _group_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)
