"""LM heads for Megatron-Core: the low-rank output layer and how to install it."""
from .install import (
    LowRankHeadConfig,
    build_gpt_model,
    install_low_rank_head,
    low_rank_head_hook,
    padded_vocab_size,
)
from .low_rank import LowRankOutputLayer, validate_head_shape

__all__ = [
    "LowRankOutputLayer",
    "LowRankHeadConfig",
    "install_low_rank_head",
    "low_rank_head_hook",
    "build_gpt_model",
    "padded_vocab_size",
    "validate_head_shape",
]
