"""Megatron-Core GPT and Hybrid models: a Llama-style local spec with sequence-parallel norms, a local hybrid
stack spec, and the builders."""
from .gpt import build_gpt_model, padded_vocab_size
from .hybrid import build_hybrid_model, default_hybrid_pattern, local_hybrid_stack_spec
from .llama import SequenceParallelNorm, llama_block_spec, llama_config

__all__ = ["build_gpt_model", "padded_vocab_size", "build_hybrid_model", "default_hybrid_pattern",
           "local_hybrid_stack_spec", "SequenceParallelNorm", "llama_block_spec", "llama_config"]
