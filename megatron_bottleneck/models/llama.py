"""Layer specs for Megatron-Core's local (non-Transformer-Engine) path.

* :class:`SequenceParallelNorm`: RMSNorm / LayerNorm in plain torch that supports sequence
  parallelism (Megatron's ``WrappedTorchNorm`` asserts it does not). Under SP each rank normalises
  its sequence shard and its weight gradient is partial, so the weight (and bias) are marked
  ``sequence_parallel = True`` and ``finalize_model_grads`` all-reduces them over TP.
* :func:`llama_block_spec`: a Llama-style block (RoPE is chosen on the model; RMSNorm, SwiGLU and
  grouped-query attention come from the config, see :func:`llama_config`) using that norm; or, with
  ``transformer_engine=True`` (the default when ``config.fp8`` is set), Megatron's Transformer Engine layer
  spec, whose linear layers run in FP8 under Megatron's FP8 autocast (``config.fp8`` / ``config.fp8_recipe``).
* :func:`llama_config`: a ``TransformerConfig`` with Llama's choices.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from ..base.groups import default_tp_group
from ..heads.install import require_transformer_engine

__all__ = ["SequenceParallelNorm", "llama_block_spec", "llama_config"]


class SequenceParallelNorm(torch.nn.Module):
    """y = x / rms(x) * w (RMSNorm) or (x - mean) / std * w + b (LayerNorm), per token.

    Follows ``config.normalization`` ('RMSNorm' or 'LayerNorm') and ``config.sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, tp_group=None):
        super().__init__()
        self.config = config
        self.tp_group = default_tp_group(tp_group)
        self.eps = eps
        self.rms = getattr(config, "normalization", "LayerNorm") == "RMSNorm"
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("SequenceParallelNorm does not implement layernorm_zero_centered_gamma.")
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        sp = bool(getattr(config, "sequence_parallel", False))
        for p in (self.weight, self.bias):
            if p is not None:
                p.sequence_parallel = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if self.rms:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return F.layer_norm(x, shape, self.weight, self.bias, self.eps)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Replicated over TP (one main replica per TP group) for distributed checkpointing."""
        dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
            with_context_parallel=True
        )
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=dp_cp_group,
        )


def llama_block_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                     transformer_engine: Optional[bool] = None):
    """``TransformerBlockSubmodules`` for this pipeline stage: local layers with SP-capable norms, or
    Transformer Engine layers (``transformer_engine``; None: when ``config.fp8`` is set, since Megatron runs
    FP8 only through TE). TE must be installed for the latter (:class:`HeadConfigError` otherwise)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if transformer_engine is None:
        transformer_engine = bool(getattr(config, "fp8", None))
    if transformer_engine:
        require_transformer_engine("the Transformer Engine layer spec" + (
            f" (fp8={config.fp8!r})" if getattr(config, "fp8", None) else ""))
        from megatron.core.extensions.transformer_engine import TENorm  # optional: imports transformer_engine

        return TransformerBlockSubmodules(layer_specs=[get_gpt_layer_with_transformer_engine_spec()] * num_layers,
                                          layer_norm=TENorm)
    layer = get_gpt_layer_local_spec(normalization=getattr(config, "normalization", "LayerNorm"))
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules,
            input_layernorm=SequenceParallelNorm,
            pre_mlp_layernorm=SequenceParallelNorm,
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=SequenceParallelNorm)


def llama_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: Optional[int] = None,
    ffn_hidden_size: Optional[int] = None,
    **kwargs,
):
    """A ``TransformerConfig`` with Llama's choices: RMSNorm, SwiGLU, no linear biases, GQA.

    Pass the model with ``position_embedding_type='rope'`` (the default of
    :func:`megatron_bottleneck.build_gpt_model`). Other keyword arguments go to TransformerConfig.
    """
    defaults = dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=1e-5,
    )
    defaults.update(kwargs)
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size,
        **defaults,
    )
