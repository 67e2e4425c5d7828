"""Data: SpamLang and fixed-length indexed datasets (Megatron's .bin/.idx)."""
from .loader import IndexedSequences, batch_stream
from .spamlang import (SpamLangConfig, SpamLangTokenizer, coverage, draw_symbols, expected_min_count,
                       generate_spamlang, spamlang_gpt_dataset)

__all__ = ["SpamLangConfig", "generate_spamlang", "draw_symbols", "coverage", "expected_min_count",
           "IndexedSequences", "batch_stream", "SpamLangTokenizer", "spamlang_gpt_dataset"]
