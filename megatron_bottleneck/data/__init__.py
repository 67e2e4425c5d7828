"""Data: SpamLang, real text (SentencePiece), and Megatron indexed datasets (.bin/.idx)."""
from .loader import IndexedSequences, batch_stream
from .spamlang import (SpamLangConfig, SpamLangTokenizer, coverage, draw_symbols, expected_min_count,
                       generate_spamlang, spamlang_gpt_dataset)

from .text import DataError, read_documents, tokenize_to_indexed, train_tokenizer

__all__ = ["train_tokenizer", "tokenize_to_indexed", "read_documents", "DataError",
           "SpamLangConfig", "generate_spamlang", "draw_symbols", "coverage", "expected_min_count",
           "IndexedSequences", "batch_stream", "SpamLangTokenizer", "spamlang_gpt_dataset"]
