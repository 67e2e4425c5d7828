"""``import megatron_bottleneck.megatron_lm as mbl``: the Megatron-LM entry point.

Re-exports :mod:`megatron_bottleneck.integrations.megatron_lm`; ``python -m megatron_bottleneck.megatron_lm
pretrain_gpt.py <args>`` runs an unchanged training script with the head and probe.
"""
from ..integrations.megatron_lm import *  # noqa: F401,F403
from ..integrations.megatron_lm import USAGE, __all__  # noqa: F401
