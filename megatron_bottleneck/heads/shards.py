"""What every vocabulary-parallel head of ours shares about its parameters: the distributed checkpoint layout and
the check of a weight supplied in its place (Megatron's ``output_weight``, e.g. a shared embedding or a test's).

A head that mixes in :class:`VocabSharded` has ``weight`` = this rank's vocabulary shard (``[V/tp, ...]``, rows
``[rank * V/tp, (rank + 1) * V/tp)`` of the full matrix) and ``tp_group``; every other parameter is replicated over
the tensor-parallel ranks. Megatron's own ``ColumnParallelLinear`` (the dense head) has its own.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

__all__ = ["VocabSharded"]


class VocabSharded:
    """Mixin: ``sharded_state_dict`` (``weight`` sharded along the vocabulary, axis 0, over ``tp_group``; the rest
    replicated: a checkpoint saved at one TP loads at another) and :meth:`supplied_weight`."""

    weight: torch.nn.Parameter
    tp_group: object

    def supplied_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``weight`` if given (it must have the shape of this rank's ``weight`` shard; a RuntimeError naming both
        shapes otherwise), else ``self.weight``."""
        if weight is None:
            return self.weight
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not the {type(self).__name__} "
                               f"head's weight shard {tuple(self.weight.shape)}")
        return weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron ``ShardedTensor``s of the head's parameters: ``weight`` on axis 0 over ``tp_group``, every other
        one replicated; replicas deduplicated over ``metadata["dp_cp_group"]`` (default: Megatron's data x context
        parallel group)."""
        dp_cp_group = (metadata or {}).get("dp_cp_group")
        if dp_cp_group is None:
            dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp_group)
