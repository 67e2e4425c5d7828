"""Megatron-Core GPT models: a Llama-style local spec with sequence-parallel norms, and the builder."""
from .gpt import build_gpt_model, padded_vocab_size
from .llama import SequenceParallelNorm, llama_block_spec, llama_config

__all__ = ["build_gpt_model", "padded_vocab_size", "SequenceParallelNorm", "llama_block_spec", "llama_config"]
