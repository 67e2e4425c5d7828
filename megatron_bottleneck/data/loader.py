"""Deterministic, resumable batches from a Megatron indexed dataset of fixed-length sequences.

Each document holds ``seq_length + 1`` tokens; a sample is ``tokens = doc[:-1]``, ``labels = doc[1:]``.
The order is a per-epoch permutation drawn from ``seed`` and the epoch number, so the position in the
stream (``consumed`` sequences) is all a checkpoint needs to resume exactly. Data-parallel rank ``r`` of
``dp`` takes rows ``[r::dp]`` of every global batch.
"""
from __future__ import annotations

from typing import Dict, Iterator

import numpy as np
import torch


class IndexedSequences:
    """Fixed-length documents of a Megatron indexed dataset (``<prefix>.bin`` / ``.idx``)."""

    def __init__(self, prefix: str):
        import os

        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
            raise FileNotFoundError(
                f"no indexed dataset at {prefix!r} (expected {prefix}.bin and {prefix}.idx); "
                "generate one with `megatron-bottleneck spamlang` or tokenise text first."
            )
        self.dataset = IndexedDataset(prefix)
        lengths = np.asarray(self.dataset.sequence_lengths)
        if lengths.size == 0 or (lengths != lengths[0]).any():
            raise ValueError(f"{prefix!r}: documents must all have the same length (got {set(lengths.tolist())}).")
        self.doc_length = int(lengths[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.dataset[i], dtype=np.int64)


def batch_stream(data: IndexedSequences, global_batch: int, micro_batch: int, seed: int, consumed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches of this DP rank, starting after ``consumed`` sequences (global count)."""
    n = len(data)
    local = global_batch // dp_size
    perms: Dict[int, np.ndarray] = {}

    def sequence_at(p: int) -> int:
        epoch, offset = divmod(p, n)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return int(perms[epoch][offset])

    pos = consumed
    while True:
        idx = [sequence_at(pos + k) for k in range(global_batch)]
        mine = idx[dp_rank * local:(dp_rank + 1) * local]
        for start in range(0, local, micro_batch):
            docs = np.stack([data[i] for i in mine[start:start + micro_batch]])
            t = torch.from_numpy(docs)
            yield {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                   "loss_mask": torch.ones(t.shape[0], t.shape[1] - 1)}
        pos += global_batch
