"""Megatron-LM's GPT data path: variable-length documents packed into sequences, blends, splits, mock data.

Everything is built by megatron-core itself::

    BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank=lambda: True, GPTDatasetConfig(...)).build()

so a run reads the same ``.bin``/``.idx`` corpora, blends and splits as Megatron-LM:

* one prefix, or a blend written as Megatron-LM writes it: ``"0.7 path/a 0.3 path/b"`` (a string or its
  ``split()`` list; parsed with megatron's ``get_blend_from_list``), split into train/valid/test by
  ``split="969,30,1"``;
* or a blend per split (``valid=...`` and/or ``test=...`` given): ``split`` is then ignored;
* ``mock=True``: megatron's ``MockGPTDataset`` (random documents, no files);
* the shuffle/sample index cache goes to ``cache_dir`` (put it inside the run dir: ``<run>/data_cache``).

Samples are GPTDataset's: ``seq_length + 1`` consecutive tokens of the packed, shuffled documents (EOD
between documents), shifted into ``tokens`` / ``labels`` of ``seq_length`` each. :func:`batches` turns a
dataset into the trainer's deterministic, resumable micro-batches.

:func:`validate_gpt_data` runs before ranks start (``build_gpt_datasets`` calls it too) and raises a
one-line :class:`~megatron_bottleneck.base.errors.DataError` naming the fix for: a missing ``.bin``/``.idx``,
an empty corpus, token ids beyond ``vocab_size``, a split that leaves a needed part without documents.
The largest token id is read from a sidecar ``<prefix>.meta.json`` (``{"max_token_id": N}``, written by
:func:`write_metadata`) when there is one, else from SpamLang's ``<output>.json`` next to its splits, else
by scanning the ``.bin`` through a numpy memmap in chunks (O(corpus) reads, fine up to a few GB; write the
sidecar once for big corpora).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                    parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from ..base.errors import DataError

Blend = Union[str, Sequence[str], None]
_SPLITS = ("train", "valid", "test")


class IdTokenizer:
    """The attributes megatron's GPTDataset reads from a tokenizer, for already-tokenised data.

    Defaults follow :mod:`megatron_bottleneck.data.text` (unk 0, EOD 1, pad 2); SpamLang uses EOD 0.
    """

    def __init__(self, vocab_size: int, eod: int = 1, pad: int = 2):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = pad
        self.unique_identifiers = {"class": "IdTokenizer", "vocab_size": vocab_size, "eod": eod, "pad": pad}


# --------------------------------------------------------------------------- blends
def parse_blend(blend: Blend) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """``"0.7 a 0.3 b"`` / ``["0.7", "a", "0.3", "b"]`` / ``"a"`` -> megatron's ``(prefixes, weights)``."""
    if blend is None:
        return None
    words = blend.split() if isinstance(blend, str) else [str(w) for w in blend]
    if not words:
        return None
    if len(words) % 2 == 0:
        weights = words[0::2]
        numeric = []
        for w in weights:
            try:
                numeric.append(float(w))
            except ValueError:
                numeric = []
                break
        if numeric and any(x < 0 for x in numeric):
            raise DataError(f"blend {' '.join(words)!r} has a negative weight: weights must be >= 0")
    parsed = get_blend_from_list(words)
    if parsed[1] is not None and sum(parsed[1]) <= 0:
        raise DataError(f"blend {' '.join(words)!r}: the weights sum to 0")
    return parsed


# ----------------------------------------------------------------------- metadata
def _meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def write_metadata(prefix: str) -> Dict:
    """Scan ``<prefix>.bin`` once and write ``<prefix>.meta.json`` (max token id, documents, tokens)."""
    meta = _scan(prefix)
    with open(_meta_path(prefix), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return meta


def _scan(prefix: str, chunk: int = 1 << 24) -> Dict:
    ds = IndexedDataset(prefix, mmap=True)
    dtype = ds.index.dtype
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    top = -1
    for start in range(0, data.size, chunk):
        top = max(top, int(data[start:start + chunk].max()))
    return {"max_token_id": top, "documents": len(ds), "tokens": int(data.size)}


def max_token_id(prefix: str) -> int:
    """The largest token id in a corpus (sidecar, SpamLang metadata, or a memmap scan; see the module doc)."""
    path = _meta_path(prefix)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["max_token_id"])
    head, _, tail = prefix.rpartition("_")
    spam = head + ".json"
    if tail in ("train", "valid") and os.path.exists(spam):
        with open(spam, encoding="utf-8") as f:
            meta = json.load(f)
        if "config" in meta and "vocab_size" in meta["config"]:
            return int(meta["config"]["vocab_size"]) - 1  # an upper bound: the symbols are drawn below it
    return _scan(prefix)["max_token_id"]


# ---------------------------------------------------------------------- validation
def _documents(prefix: str) -> int:
    return len(IndexedDataset(prefix, mmap=True))


def _check_prefix(prefix: str, vocab_size: int, where: str) -> int:
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise DataError(f"{where}: no indexed dataset at {prefix!r} (missing {' and '.join(prefix + m for m in missing)}); "
                        "fix the path (a prefix, without .bin/.idx) or write the corpus with tokenize_to_indexed, "
                        "Megatron-LM's tools/preprocess_data.py or `megatron-bottleneck spamlang`")
    n = _documents(prefix)
    if n == 0:
        raise DataError(f"{where}: {prefix!r} holds no documents; re-tokenise non-empty input")
    top = max_token_id(prefix)
    if top >= vocab_size:
        raise DataError(f"{where}: {prefix!r} has token id {top} but the model's vocabulary has {vocab_size} ids; "
                        f"set model.vocab_size >= {top + 1} (or tokenise with the model's tokenizer)")
    return n


def _split_ranges(split: str) -> List[Optional[Tuple[float, float]]]:
    bad = DataError(f"split={split!r} is not a valid train,valid,test split: use e.g. '969,30,1'")
    try:
        vector = parse_and_normalize_split(split)
    except (AssertionError, ValueError, ZeroDivisionError):
        raise bad from None
    if not all(np.isfinite(vector)):
        raise bad
    return convert_split_vector_to_split_matrix(vector)


def validate_gpt_data(train: Blend = None, valid: Blend = None, test: Blend = None, *, vocab_size: int,
                      split: str = "969,30,1", num_samples: Sequence[Optional[int]] = (None, None, None),
                      mock: bool = False) -> Dict[str, int]:
    """Check the corpora before any rank starts; returns ``{prefix: documents}``. See the module docstring."""
    if mock:
        return {}
    per_split = valid is not None or test is not None
    if train is None and not per_split:
        raise DataError("no data: give a train prefix or blend (e.g. '0.7 path/a 0.3 path/b'), or mock=True")
    counts: Dict[str, int] = {}
    if per_split:
        for name, blend in zip(_SPLITS, (train, valid, test)):
            parsed = parse_blend(blend)
            if parsed is None:
                continue
            for p in parsed[0]:
                counts[p] = _check_prefix(p, vocab_size, f"{name} data")
        return counts
    parsed = parse_blend(train)
    ranges = _split_ranges(split)
    for p in parsed[0]:
        n = counts[p] = _check_prefix(p, vocab_size, "data")
        for i, name in enumerate(_SPLITS):
            wanted = num_samples[i] if i < len(num_samples) else None
            if ranges[i] is None or wanted == 0:
                continue
            beg, end = int(round(ranges[i][0] * n)), int(round(ranges[i][1] * n))
            if end <= beg:
                raise DataError(f"split={split!r} leaves the {name} split of {p!r} ({n} documents) empty; "
                                f"give it a larger share (e.g. '90,10,0'), more documents, or num_samples 0 for {name}")
    return counts


# ------------------------------------------------------------------------ datasets
def build_gpt_datasets(train: Blend = None, valid: Blend = None, test: Blend = None, *, seq_length: int,
                       vocab_size: int, cache_dir: str, seed: int = 1234, split: str = "969,30,1",
                       tokenizer=None, mock: bool = False,
                       num_samples: Sequence[Optional[int]] = (None, None, None),
                       eod_mask_loss: bool = False, validate: bool = True, document_aligned: bool = False):
    """``(train_ds, valid_ds, test_ds)``: megatron-core GPTDatasets (or BlendedDatasets over them; ``None``
    for a split without data), built by ``BlendedMegatronDatasetBuilder`` on this rank.

    ``train``: a prefix or a blend (``"0.7 a 0.3 b"``), split by ``split``; with ``valid``/``test`` each
    split has its own blend and ``split`` is unused. ``num_samples``: samples per split (``None``: one
    pass over the split's documents; required for a weighted blend). ``tokenizer``: anything with
    ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``; default :class:`IdTokenizer`.
    ``document_aligned``: every document holds exactly ``seq_length + 1`` tokens (SpamLang) and each sample
    is one whole document (GPTDataset with ``sequence_length = seq_length + 1`` and no extra token); read it
    with ``batches(..., document_aligned=True)``.
    """
    sizes = list(num_samples) + [None] * (3 - len(num_samples))
    if validate:
        validate_gpt_data(train, valid, test, vocab_size=vocab_size, split=split, num_samples=sizes, mock=mock)
    tokenizer = tokenizer or IdTokenizer(vocab_size)
    kw = dict(random_seed=seed, sequence_length=seq_length + 1 if document_aligned else seq_length,
              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
              create_attention_mask=False, path_to_cache=cache_dir,
              add_extra_token_to_sequence=not document_aligned)
    if mock:
        config = GPTDatasetConfig(**kw)
        cls = MockGPTDataset
        sizes = [s if s is not None else 1000 for s in sizes]
    elif valid is not None or test is not None:
        config = GPTDatasetConfig(blend_per_split=[parse_blend(b) for b in (train, valid, test)], **kw)
        cls = GPTDataset
    else:
        config = GPTDatasetConfig(blend=parse_blend(train), split=split, **kw)
        cls = GPTDataset
    missing = []
    if not mock and config.blend is not None and config.blend[1] is not None:
        for i, r in enumerate(config.split_matrix):
            if sizes[i] is None:
                if r is None or r[1] <= r[0]:
                    sizes[i] = 0  # megatron needs a size for every split of a weighted blend
                else:
                    missing.append(_SPLITS[i])
    elif not mock and config.blend_per_split:
        missing = [n for n, size, bl in zip(_SPLITS, sizes, config.blend_per_split)
                   if bl is not None and bl[1] is not None and size is None]
    if missing:
        raise DataError(f"a weighted blend needs num_samples for the {', '.join(missing)} split(s): "
                        "pass num_samples=(train, valid, test)")
    if not mock and config.blend is not None:
        # A split asked for 0 samples is not built: megatron-core would still request one token of it and,
        # for a split with no documents (a small corpus's test share), loop forever counting epochs.
        config.split_matrix = [None if sizes[i] == 0 else r for i, r in enumerate(config.split_matrix)]
    os.makedirs(cache_dir, exist_ok=True)
    with _process_group():
        return tuple(BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build())


@contextlib.contextmanager
def _process_group():
    """megatron-core 0.16's BlendedDataset asks ``torch.distributed.get_rank()`` when it writes its cache;
    outside a distributed run, lend it a one-process gloo group for the build."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------- batches
def batches(dataset, global_batch: int, micro_batch: int, consumed: int = 0, dp_rank: int = 0,
            dp_size: int = 1, document_aligned: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches, starting after ``consumed`` samples (a global count, as checkpointed).

    The order is the dataset's own (GPTDataset shuffles with its seed), so sample ``k`` of the run is
    ``dataset[k % len(dataset)]``: the position is all a resume needs. Rank ``r`` of ``dp`` takes rows
    ``[r * b, (r + 1) * b)`` of every global batch (``b = global_batch / dp``), like ``batch_stream``.
    Yields ``tokens`` / ``labels`` / ``position_ids`` (int64) and ``loss_mask`` (float32), each ``[micro, s]``.
    ``document_aligned`` (datasets built with it): a sample is one document d of s + 1 tokens, read as
    ``tokens = d[:-1]``, ``labels = d[1:]``.
    """
    cut = slice(0, -1) if document_aligned else slice(None)
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"global_batch={global_batch} must be a multiple of micro_batch x dp_size "
                         f"({micro_batch} x {dp_size})")
    n = len(dataset)
    if n == 0:
        raise DataError("the dataset is empty: nothing to batch (check the split and num_samples)")
    local = global_batch // dp_size
    pos = consumed
    while True:
        mine = [(pos + dp_rank * local + k) % n for k in range(local)]
        for start in range(0, local, micro_batch):
            samples = [dataset[i] for i in mine[start:start + micro_batch]]
            yield {"tokens": torch.stack([s["tokens"][cut] for s in samples]).long(),
                   "labels": torch.stack([s["labels"][cut] for s in samples]).long(),
                   "loss_mask": torch.stack([s["loss_mask"][cut] for s in samples]).float(),
                   "position_ids": torch.stack([s["position_ids"][cut] for s in samples]).long()}
        pos += global_batch
