"""LM heads for Megatron-Core implementing the head contract (:class:`megatron_bottleneck.base.head.LMHead`):
the low-rank output layer, Megatron's dense head, the fused head + loss, and how to install them."""
from .contract import FusedLossConfig, LossContext
from .fused import (DenseOutputLayer, FusedLossModel, as_lm_head, disable_fused_loss, enable_fused_loss,
                    fused_loss_hook, fused_model_class, head_loss, is_fused)
from .install import LowRankHeadConfig, install_low_rank_head, low_rank_head_hook
from .low_rank import LowRankOutputLayer, validate_head_shape

__all__ = ["FusedLossConfig", "LossContext", "DenseOutputLayer", "FusedLossModel", "as_lm_head",
           "fused_model_class", "enable_fused_loss", "disable_fused_loss", "fused_loss_hook", "head_loss", "is_fused",
           "LowRankOutputLayer", "LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook",
           "validate_head_shape"]
