"""LM heads for Megatron-Core: the low-rank output layer and how to install it."""
from .install import LowRankHeadConfig, install_low_rank_head, low_rank_head_hook
from .low_rank import LowRankOutputLayer, validate_head_shape

__all__ = ["LowRankOutputLayer", "LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook",
           "validate_head_shape"]
