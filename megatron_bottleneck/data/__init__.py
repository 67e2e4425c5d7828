"""Data: Megatron indexed datasets read through megatron-core's GPTDataset (blends, splits, mock), SpamLang,
real text (SentencePiece)."""
from ..base.errors import DataError
from .gpt_data import IdTokenizer, batches, build_gpt_datasets, max_token_id, parse_blend, validate_gpt_data, write_metadata
from .spamlang import SpamLangConfig, coverage, draw_symbols, generate_spamlang, spamlang_sequence_tokens
from .text import read_documents, tokenize_to_indexed, train_tokenizer

__all__ = ["DataError", "IdTokenizer", "batches", "build_gpt_datasets", "max_token_id", "parse_blend",
           "validate_gpt_data", "write_metadata", "SpamLangConfig", "coverage", "draw_symbols", "generate_spamlang",
           "spamlang_sequence_tokens", "read_documents", "tokenize_to_indexed", "train_tokenizer"]
