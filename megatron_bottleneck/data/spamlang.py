"""SpamLang (Godey & Artzi 2026, section on synthetic languages): each sequence repeats one symbol for its whole length.

The rule "next token = current token" is trivial and representable with a tiny hidden size, so a model
that fails to learn it fails for optimisation reasons. Symbols are drawn from the non-special ids
``[num_special_tokens, vocab_size)`` (id 0 is EOD), uniformly (default) or Zipf-distributed, with a numpy
Generator seeded by ``seed``: the same config always gives the same bytes.

Each sequence is one document of ``seq_length + 1`` tokens (inputs and shifted labels), written to a
Megatron indexed dataset (``<prefix>_train`` / ``<prefix>_valid`` ``.bin``/``.idx``) with
megatron.core's own ``IndexedDatasetBuilder``; ``<prefix>.json`` holds the config and the coverage of the
training split (how often each symbol was drawn), since a symbol never drawn cannot be learned. The trainer
reads it through megatron-core's GPTDataset with one sequence per sample (``data.sample: document``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from ..base.errors import ConfigError


@dataclass
class SpamLangConfig:
    vocab_size: int
    seq_length: int
    num_sequences: int
    distribution: str = "uniform"
    zipf_exponent: float = 1.0
    seed: int = 0
    valid_fraction: float = 0.05
    num_special_tokens: int = 1

    def validate(self) -> None:
        if self.vocab_size <= self.num_special_tokens + 1:
            raise ConfigError(
                f"spamlang.vocab_size={self.vocab_size} leaves fewer than 2 symbols after "
                f"{self.num_special_tokens} special token(s); use a larger vocabulary."
            )
        if self.seq_length < 1 or self.num_sequences < 2:
            raise ConfigError("spamlang.seq_length must be >= 1 and spamlang.num_sequences >= 2.")
        if self.distribution not in ("uniform", "zipf"):
            raise ConfigError(f"spamlang.distribution must be 'uniform' or 'zipf', got {self.distribution!r}.")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(f"spamlang.valid_fraction must be in (0, 1), got {self.valid_fraction}.")


def draw_symbols(cfg: SpamLangConfig) -> np.ndarray:
    """The symbol of every sequence, in order (train first, then valid)."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n_sym = cfg.vocab_size - cfg.num_special_tokens
    if cfg.distribution == "uniform":
        idx = rng.integers(0, n_sym, size=cfg.num_sequences)
    else:
        p = 1.0 / np.arange(1, n_sym + 1) ** cfg.zipf_exponent
        idx = rng.choice(n_sym, size=cfg.num_sequences, p=p / p.sum())
    return (idx + cfg.num_special_tokens).astype(np.int64)


def coverage(symbols: np.ndarray, cfg: SpamLangConfig, tokens_per_sequence: int = 1) -> Dict[str, float]:
    """How often each symbol was drawn: min / median / max count and the number never drawn."""
    counts = np.bincount(symbols, minlength=cfg.vocab_size)[cfg.num_special_tokens:] * tokens_per_sequence
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max()),
            "never_drawn": int((counts == 0).sum()), "symbols": int(counts.size)}


def _write(prefix: str, symbols: np.ndarray, length: int, vocab_size: int) -> None:
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for s in symbols:
        builder.add_document(np.full(length, int(s), dtype=dtype), [length])
    builder.finalize(prefix + ".idx")


def generate_spamlang(cfg: SpamLangConfig, output_prefix: str) -> Dict:
    """Write ``<prefix>_train``, ``<prefix>_valid`` and ``<prefix>.json``; returns the metadata."""
    symbols = draw_symbols(cfg)
    n_valid = max(1, int(round(cfg.num_sequences * cfg.valid_fraction)))
    train, valid = symbols[:-n_valid], symbols[-n_valid:]
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    length = cfg.seq_length + 1
    _write(output_prefix + "_train", train, length, cfg.vocab_size)
    _write(output_prefix + "_valid", valid, length, cfg.vocab_size)
    meta = {"config": asdict(cfg), "train_sequences": int(train.size), "valid_sequences": int(valid.size),
            "sequence_tokens": length, "coverage_sequences": coverage(train, cfg),
            "train_prefix": output_prefix + "_train", "valid_prefix": output_prefix + "_valid"}
    with open(output_prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return meta


def spamlang_sequence_tokens(prefix: str) -> Optional[int]:
    """Tokens per sequence of a SpamLang split (``<output>_train`` / ``<output>_valid``, read from
    ``<output>.json``), or None when ``prefix`` is not SpamLang."""
    head, _, tail = prefix.rpartition("_")
    path = head + ".json"
    if tail not in ("train", "valid") or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    return int(meta["sequence_tokens"]) if "sequence_tokens" in meta and "config" in meta else None
