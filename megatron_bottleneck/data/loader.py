"""Deterministic, resumable batches from a Megatron indexed dataset of fixed-length sequences.

Each document holds ``seq_length + 1`` tokens; a sample is ``tokens = doc[:-1]``, ``labels = doc[1:]``.
The order is a per-epoch permutation drawn from ``seed`` and the epoch number, so the position in the
stream (``consumed`` sequences) is all a checkpoint needs to resume exactly. Data-parallel rank ``r`` of
``dp`` takes rows ``[r::dp]`` of every global batch.

:func:`check_dataset` runs the checks that need no training process (files, lengths, vocabulary), so the
command line can report a data problem in one line before any rank starts.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ..base.errors import DataError

__all__ = ["IndexedSequences", "batch_stream", "check_dataset"]


def _open(prefix: str, key: str = "data prefix") -> IndexedDataset:
    if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
        raise DataError(f"{key}: no indexed dataset at {prefix!r} (expected {prefix}.bin and {prefix}.idx); "
                        "generate one with `megatron-bottleneck spamlang` or tokenise text first.")
    return IndexedDataset(prefix)


class IndexedSequences:
    """Fixed-length documents of a Megatron indexed dataset (``<prefix>.bin`` / ``.idx``)."""

    def __init__(self, prefix: str, key: str = "data prefix"):
        self.dataset = _open(prefix, key)
        lengths = np.asarray(self.dataset.sequence_lengths)
        if lengths.size == 0:
            raise DataError(f"{key}: {prefix!r} holds no documents.")
        if (lengths != lengths[0]).any():
            raise DataError(f"{key}: {prefix!r} has documents of different lengths ({lengths.min()} to "
                            f"{lengths.max()} tokens); this reader takes fixed-length sequences (SpamLang).")
        self.doc_length = int(lengths[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.dataset[i], dtype=np.int64)


def check_dataset(prefix: str, key: str, vocab_size: Optional[int] = None, seq_length: Optional[int] = None) -> None:
    """Raise :class:`DataError` (one line, naming ``key``) if ``prefix`` cannot feed a model with this
    vocabulary and sequence length."""
    data = IndexedSequences(prefix, key)
    if seq_length is not None and data.doc_length != seq_length + 1:
        raise DataError(f"{key}: the documents of {prefix!r} have {data.doc_length} tokens but model.seq_length="
                        f"{seq_length} needs seq_length + 1 = {seq_length + 1}: set model.seq_length="
                        f"{data.doc_length - 1}.")
    if vocab_size is not None:
        top = _max_token(prefix)
        if top >= vocab_size:
            raise DataError(f"{key}: {prefix!r} holds token id {top}, beyond model.vocab_size={vocab_size}: set "
                            f"model.vocab_size >= {top + 1} (or re-tokenise with a smaller vocabulary).")


def _max_token(prefix: str) -> int:
    """The largest token id in ``<prefix>.bin`` (memory-mapped, one pass)."""
    dtype = _open(prefix).index.dtype
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    return int(tokens.max()) if tokens.size else -1


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
