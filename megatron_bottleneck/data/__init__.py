"""Data: SpamLang, real text (SentencePiece), and Megatron indexed datasets (.bin/.idx)."""
from ..base.errors import DataError
from .loader import IndexedSequences, batch_stream, check_dataset
from .spamlang import SpamLangConfig, SpamLangTokenizer, coverage, draw_symbols, generate_spamlang, spamlang_gpt_dataset
from .text import read_documents, tokenize_to_indexed, train_tokenizer

__all__ = ["train_tokenizer", "tokenize_to_indexed", "read_documents", "DataError", "SpamLangConfig",
           "generate_spamlang", "draw_symbols", "coverage", "IndexedSequences", "batch_stream", "check_dataset",
           "SpamLangTokenizer", "spamlang_gpt_dataset"]
