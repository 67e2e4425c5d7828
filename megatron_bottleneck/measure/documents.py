"""The documents ``megatron-bottleneck measure`` runs a model on, by the paper's protocol: documents shuffled
with a seed, the first ``documents`` of them (10,000 by default), each cut to the model's context.

Sources (one or more paths, concatenated in the order given, then shuffled):

* ``.txt``: documents separated by blank lines; ``.jsonl``: one JSON object per line, its ``text`` field, or a
  ``tokens`` field (a list of token ids, used as is); both read by :func:`megatron_bottleneck.data.text.read_documents`'
  rules and tokenised with the model's tokenizer (HuggingFace: ``tokenizer(text)["input_ids"]``, special tokens
  as the tokenizer adds them, e.g. Llama's BOS);
* an indexed dataset, ours or Megatron-LM's (``PREFIX`` with ``PREFIX.bin`` / ``PREFIX.idx``, or either file):
  each of its documents as token ids.

A document of n tokens gives min(n, L + 1) - 1 predictions: inputs ``ids[:L]``, labels ``ids[1:L + 1]``, L the
sequence length (``--seq-length``, else the model's context). Documents with fewer than 2 tokens are dropped.
``max_tokens`` cuts the list (and the last document) so that the predictions total at most that many.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable, List, Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from ..base.errors import DataError
from ..data.text import read_documents

__all__ = ["load_documents", "shard"]


def _indexed_prefix(path: str) -> Optional[str]:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            path = path[: -len(ext)]
    if os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"):
        return path
    return None


def _jsonl_tokens(path: str) -> Optional[List[List[int]]]:
    """The ``tokens`` lists of a .jsonl whose first object has one (else None: it is text)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return []
    try:
        if "tokens" not in json.loads(first):
            return None
    except json.JSONDecodeError:
        return None
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if "tokens" not in obj:
                    raise DataError(f"{path}:{n}: no 'tokens' key (the first line has one: use it on every line)")
                out.append([int(t) for t in obj["tokens"]])
    return out


def _read(paths: Sequence[str], tokenize: Optional[Callable[[str], List[int]]]) -> List:
    """Every document of every path: a token-id array or (text sources) a string, tokenised later."""
    docs: List = []
    for path in paths:
        prefix = _indexed_prefix(path)
        if prefix is not None:
            ds = IndexedDataset(prefix, mmap=True)
            docs.extend(("indexed", ds, i) for i in range(len(ds)))
            continue
        if not os.path.isfile(path):
            raise DataError(f"--data {path}: no such file (a .txt / .jsonl file or an indexed dataset PREFIX with "
                            "PREFIX.bin and PREFIX.idx)")
        tokens = _jsonl_tokens(path) if path.endswith(".jsonl") else None
        if tokens is not None:
            docs.extend(tokens)
            continue
        if not path.endswith((".txt", ".jsonl")):
            raise DataError(f"--data {path}: not a .txt / .jsonl file nor an indexed dataset (PREFIX.bin + .idx)")
        if tokenize is None:
            raise DataError(f"--data {path} is text, but the model has no tokenizer: give token ids (a .jsonl with "
                            "'tokens' lists, or an indexed dataset)")
        docs.extend(read_documents(path))
    return docs


def load_documents(paths: Sequence[str], tokenize: Optional[Callable[[str], List[int]]], *, documents: int = 10000,
                   seq_length: int, seed: int = 0, max_tokens: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> List[np.ndarray]:
    """The measured documents, in order: each an int64 array of min(n, seq_length + 1) token ids (inputs
    ``[:-1]``, labels ``[1:]``). Shuffled with ``random.Random(seed)`` over all documents of ``paths``, the
    first ``documents`` kept (0 or None: all), cut at ``max_tokens`` predictions. Raises a one-line
    :class:`DataError` when nothing is left (data that tokenises to nothing) or a token id is >= vocab_size."""
    if seq_length < 1:
        raise DataError(f"--seq-length must be >= 1, got {seq_length}")
    pool = _read(paths, tokenize)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    out: List[np.ndarray] = []
    total = 0
    for i in order:
        if documents and len(out) >= documents:
            break
        if max_tokens and total >= max_tokens:
            break
        doc = pool[i]
        if isinstance(doc, tuple):
            ids = np.asarray(doc[1][doc[2]], dtype=np.int64)
        elif isinstance(doc, str):
            ids = np.asarray(tokenize(doc), dtype=np.int64)
        else:
            ids = np.asarray(doc, dtype=np.int64)
        ids = ids[: seq_length + 1]
        if max_tokens:
            ids = ids[: max_tokens - total + 1]
        if ids.shape[0] < 2:
            continue
        if vocab_size is not None and (ids.max() >= vocab_size or ids.min() < 0):
            raise DataError(f"--data: token id {int(ids.max())} is outside the model's vocabulary [0, {vocab_size}); "
                            "the data was tokenised for another model")
        out.append(ids)
        total += ids.shape[0] - 1
    if not out:
        raise DataError(f"--data {' '.join(paths)}: no document with at least 2 tokens (the data tokenises to "
                        "nothing); give non-empty documents")
    return out


def shard(docs: List[np.ndarray], rank: int, world: int, first_tokens: int = 0) -> List[int]:
    """Indices of the documents rank ``rank`` of ``world`` measures: the documents holding the first
    ``first_tokens`` predictions (the rank curve's) all on rank 0, the rest dealt round-robin."""
    head, total = 0, 0
    while head < len(docs) and total < first_tokens:
        total += docs[head].shape[0] - 1
        head += 1
    rest = list(range(head, len(docs)))
    mine = list(range(head)) if rank == 0 else []
    return mine + rest[rank::world]
