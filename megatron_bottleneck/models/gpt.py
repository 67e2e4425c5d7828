"""Build a Megatron-Core GPTModel for this pipeline stage, with any registered head (low-rank, mixture of
softmaxes, ...) if asked."""
from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ..heads.model_loss import FusedLossConfig, as_lm_head, check_fusable, fused_model_class
from ..base.head import HeadConfig
from ..heads.install import (LowRankHeadConfig, as_head_config, install_head, refuse_from_dense_before_load,
                             require_transformer_engine_for_fp8)
from ..heads.low_rank import validate_head_shape
from .llama import llama_block_spec

__all__ = ["build_gpt_model", "padded_vocab_size"]


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Megatron-LM's padding: the smallest multiple of ``divisible_by * tp`` that holds the vocab."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_gpt_model(
    config,
    vocab_size: int,
    max_sequence_length: int,
    *,
    head_rank: Optional[int] = None,
    head: "LowRankHeadConfig | HeadConfig | str | None" = None,
    layer_spec=None,
    position_embedding_type: str = "rope",
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    real_vocab_size: Optional[int] = None,
    fused_loss: "bool | FusedLossConfig" = False,
    **gpt_kwargs,
):
    """Build a GPTModel (untied embeddings) for this pipeline stage, with a rank-r head if asked.

    ``vocab_size`` must already be padded for TP (see :func:`padded_vocab_size`). ``layer_spec``
    defaults to :func:`megatron_bottleneck.models.llama_block_spec`. ``head_rank=None`` keeps
    Megatron's dense head. ``head``: a :class:`~megatron_bottleneck.heads.LowRankHeadConfig`, or any registered
    head as a :class:`~megatron_bottleneck.base.head.HeadConfig` (or ``"mos:k=4"``), installed after the model is
    built (:func:`~megatron_bottleneck.heads.install_head`). ``real_vocab_size``: the tokenizer's vocabulary before padding, recorded on the
    head as its ``vocab_size`` (the head contract) so the probe and the fused loss leave the padding out.
    ``fused_loss`` (True or a :class:`~megatron_bottleneck.heads.FusedLossConfig`): the model is a
    ``FusedLossGPTModel`` (:func:`~megatron_bottleneck.heads.fused_model_class`) whose forward with labels
    computes the loss with the head's own loss (fused where the head allows it: no T x V logits).
    ``config.mtp_num_layers`` (multi-token prediction): the MTP block is Megatron's ``get_gpt_mtp_block_spec`` of
    ``layer_spec`` (local layers, TE ones with ``config.fp8``) unless ``mtp_block_spec`` is given; the head is
    shared by the MTP depths as Megatron's output layer is.
    """
    require_transformer_engine_for_fp8(config)
    head, fused_from_head = prepare_head(config, vocab_size, head, head_rank)
    gpt_kwargs.setdefault("share_embeddings_and_output_weights", False)
    pre_process, post_process = stage_ends(pre_process, post_process, vp_stage)
    if layer_spec is None:
        layer_spec = llama_block_spec(config, vp_stage=vp_stage)
    if getattr(config, "mtp_num_layers", None) and "mtp_block_spec" not in gpt_kwargs:
        gpt_kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, layer_spec, use_transformer_engine=bool(getattr(config, "fp8", None)), vp_stage=vp_stage)
    extra = {"vp_stage": vp_stage} if vp_stage is not None else {}
    if fused_loss:
        check_fusable(config)
    model = (fused_model_class(GPTModel) if fused_loss else GPTModel)(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=position_embedding_type,
        **extra,
        **gpt_kwargs,
    )
    return finish_head(model, head, fused_from_head, post_process, real_vocab_size, fused_loss)


def prepare_head(config, vocab_size: int, head, head_rank: Optional[int]):
    """The head a builder installs, checked before anything is built (an unknown kind or option, a rank that does
    not fit: one line): ``(HeadConfig or None, fused_from_head)``; ``head_rank`` alone means a low-rank head."""
    if head is None and head_rank is not None:
        head = LowRankHeadConfig(rank=head_rank)
    fused_from_head = getattr(head, "fused_loss", False) if isinstance(head, LowRankHeadConfig) else False
    if head is not None:
        head = as_head_config(head)
        options = head.resolved_options()
        refuse_from_dense_before_load(head, "a model builder")
        if head.kind == "low_rank":
            validate_head_shape(config.hidden_size, vocab_size, options.r, config.tensor_model_parallel_size)
    return head, fused_from_head


def stage_ends(pre_process: Optional[bool], post_process: Optional[bool], vp_stage: Optional[int]):
    """``(pre_process, post_process)`` of this pipeline stage where not given."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return pre_process, post_process


def finish_head(model, head, fused_from_head: bool, post_process: bool, real_vocab_size: Optional[int],
                fused_loss):
    """Install ``head`` on a built model (GPTModel or HybridModel), record the real vocabulary on the last stage's
    head and the fused loss's config; returns the model."""
    if head is not None:
        install_head(model, head, fused_loss=fused_from_head)
    if post_process and (real_vocab_size is not None or fused_loss):
        as_lm_head(model.output_layer, real_vocab_size)
    if fused_loss:
        config = fused_loss if isinstance(fused_loss, FusedLossConfig) else FusedLossConfig()
        config.check_model_path(model.output_layer.vocab_size if post_process else None)
        model.fused_loss_config = config
    return model
