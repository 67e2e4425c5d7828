"""LM heads for Megatron-Core: the low-rank output layer and how to install it."""
from .fused import FusedLossConfig, disable_fused_loss, enable_fused_loss, head_loss
from .install import LowRankHeadConfig, install_low_rank_head, low_rank_head_hook
from .low_rank import LowRankOutputLayer, validate_head_shape

__all__ = ["FusedLossConfig", "enable_fused_loss", "disable_fused_loss", "head_loss", "LowRankOutputLayer", "LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook",
           "validate_head_shape"]
