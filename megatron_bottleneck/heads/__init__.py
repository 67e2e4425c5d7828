"""LM heads for Megatron-Core implementing the head contract (:class:`megatron_bottleneck.base.head.LMHead`):
the low-rank output layer, Megatron's dense head, the head's loss wired into Megatron's model (``model_loss``), the built-in non-linear heads
(mixture of softmaxes, pointwise logit maps, stacked, multi-facet), the head registry's built-in kinds and how to install
any registered head."""
from ..base.head import HEADS, HeadConfig, HeadRegistry, HeadSpec, get_head_builder, register_head, registered_heads
from .builtin import DenseOptions, LowRankOptions
from .contract import FusedLossConfig, LossContext
from .model_loss import (DenseOutputLayer, FusedLossModel, as_lm_head, disable_fused_loss, enable_fused_loss,
                         fused_loss_hook, fused_model_class, head_loss, is_fused)
from .install import LowRankHeadConfig, head_hook, install_head, install_low_rank_head, low_rank_head_hook
from .low_rank import LowRankOutputLayer, validate_head_shape
from .mfs import MultiFacetHead, MultiFacetOptions
from .mos import MixtureOfSoftmaxesHead, MixtureOfSoftmaxesOptions
from .pointwise import MonotoneOptions, PointwiseLogitHead, SigsoftmaxOptions, SoftcapOptions
from .stacked import StackedHead, StackedOptions
from .vocab_parallel import VocabParallelHead

__all__ = ["FusedLossConfig", "LossContext", "DenseOutputLayer", "FusedLossModel", "as_lm_head",
           "fused_model_class", "enable_fused_loss", "disable_fused_loss", "fused_loss_hook", "head_loss", "is_fused",
           "LowRankOutputLayer", "LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook",
           "validate_head_shape", "HeadConfig", "register_head", "get_head_builder", "registered_heads",
           "HeadRegistry", "HeadSpec", "HEADS",
           "install_head", "head_hook", "DenseOptions", "LowRankOptions", "MixtureOfSoftmaxesHead",
           "MixtureOfSoftmaxesOptions", "PointwiseLogitHead", "SigsoftmaxOptions", "SoftcapOptions",
           "MonotoneOptions", "StackedHead", "StackedOptions", "MultiFacetHead", "MultiFacetOptions",
           "VocabParallelHead"]
