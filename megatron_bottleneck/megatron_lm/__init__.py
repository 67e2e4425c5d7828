"""``import megatron_bottleneck.megatron_lm as mbl``: the Megatron-LM entry point.

Re-exports :mod:`megatron_bottleneck.integrations.megatron_lm`; ``python -m megatron_bottleneck.megatron_lm
pretrain_gpt.py <args>`` runs an unchanged training script with the head and probe.
"""
from ..integrations.megatron_lm import (  # noqa: F401
    USAGE,
    add_arguments,
    extra_args_provider,
    get_probe,
    install_head_from_args,
    main,
    patch,
    real_vocab_size,
    wrap_forward_step,
    wrap_model_provider,
)

__all__ = [
    "add_arguments",
    "extra_args_provider",
    "wrap_model_provider",
    "wrap_forward_step",
    "install_head_from_args",
    "get_probe",
    "real_vocab_size",
    "patch",
    "main",
]
