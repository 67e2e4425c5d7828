"""Megatron-Core's HybridModel (megatron-core >= 0.19) with a local (non-Transformer-Engine) stack spec, and its
builder.

A hybrid layer pattern is a string with one symbol per layer: ``*`` attention, ``-`` MLP, ``M`` Mamba (``|``
separates pipeline stages, ``/`` multi-token-prediction depths: ``"*-*-/*-"`` one depth of an attention and an MLP
layer, with ``config.mtp_num_layers`` = the number of depths). A pattern of ``*`` and ``-`` only is a plain
transformer: ``"*-*-"`` is the two-layer GPTModel whose layer k is hybrid layers 2k (input norm + attention)
and 2k + 1 (pre-MLP norm + MLP), with the same parameters under other names.

* :func:`local_hybrid_stack_spec`: Megatron's ``HybridStack`` built from the same local layers as
  :func:`~megatron_bottleneck.models.llama_block_spec` (Megatron-Core's ``get_gpt_layer_local_spec`` with
  :class:`~megatron_bottleneck.models.SequenceParallelNorm`): runs on CPU and without Transformer Engine, under
  TP, SP and PP. Megatron's own ``hybrid_stack_spec`` needs TE's layers. Mamba layers need Mamba's CUDA kernels
  (and TE): refused in one line on CPU, taken from Megatron's spec on GPUs.
* :func:`build_hybrid_model`: :func:`~megatron_bottleneck.models.build_gpt_model`'s signature with the layer
  pattern; any registered head, the fused loss.

megatron-core 0.16 has no ``models/hybrid`` (its ``MambaModel`` predates the unified pattern, multi-token
prediction in the pattern and the ``|`` stage separators): :func:`build_hybrid_model` refuses it in one line.
"""
from __future__ import annotations

import dataclasses
from importlib.metadata import version
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock, MultiTokenPredictionBlockSubmodules, MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules)
from megatron.core.transformer.spec_utils import ModuleSpec

from ..base.errors import ConfigError
from ..base.head import HeadConfig
from ..heads.model_loss import FusedLossConfig, check_fusable, fused_model_class
from ..heads.install import LowRankHeadConfig, require_transformer_engine, require_transformer_engine_for_fp8
from .gpt import finish_head, prepare_head, stage_ends
from .llama import SequenceParallelNorm

__all__ = ["build_hybrid_model", "local_hybrid_stack_spec", "default_hybrid_pattern", "require_hybrid_model",
           "LOCAL_SYMBOLS", "LOCAL_HYBRID_STACK_SPEC"]

LOCAL_SYMBOLS = "*-"
"""Layer symbols the local spec builds on any device (attention, MLP); ``M`` (Mamba) on GPUs only."""
_STRUCTURE = "|/"

try:  # megatron-core >= 0.19
    from megatron.core.models.hybrid.hybrid_block import HybridStack as _HybridStack, HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel as _HybridModel
except ImportError:  # megatron-core 0.16: no models/hybrid (require_hybrid_model says so in one line)
    _HybridStack = _HybridModel = HybridStackSubmodules = None


def require_hybrid_model():
    """Megatron-Core's ``HybridModel`` class; one line (:class:`ConfigError`) when the installed megatron-core
    has none (< 0.19)."""
    if _HybridModel is None:
        raise ConfigError(
            f"HybridModel needs megatron-core >= 0.19 (installed: {version('megatron-core')}, which has no "
            "megatron.core.models.hybrid): upgrade megatron-core, or build a GPTModel (build_gpt_model).")
    return _HybridModel


if _HybridStack is not None:

    class LocalHybridStack(_HybridStack):
        """Megatron's ``HybridStack`` whose final norm is :class:`SequenceParallelNorm` (Megatron's stack hard-codes
        TE's ``TENorm``): y = x / rms(x) * w (or LayerNorm, per ``config.normalization``) on [s(/tp), b, D]."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            _check_layers(submodules, kwargs.get("layer_type_list") or ())
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = SequenceParallelNorm(config, config.hidden_size, eps=config.layernorm_epsilon,
                                                       tp_group=self.tp_group)


_LAYER_FIELDS = {"M": "mamba_layer", "G": "gdn_layer", "*": "attention_layer", "D": "dsa_layer", "+": "mla_layer",
                 "-": "mlp_layer", "E": "moe_layer"}


def _check_layers(submodules, layer_types) -> None:
    """One line for a layer symbol whose layer this stack spec leaves out (Megatron's ``HybridStack`` would build an
    ``IdentityOp`` there: a layer that silently does nothing)."""
    absent = sorted({t for t in layer_types if getattr(submodules, _LAYER_FIELDS.get(t, ""), IdentityOp) is IdentityOp})
    if absent:
        raise ConfigError(
            f"hybrid layer pattern symbol(s) {', '.join(repr(t) for t in absent)}: this local hybrid stack spec has no "
            "such layer (it builds attention '*' and MLP '-' layers; Mamba 'M' on GPUs through "
            "local_hybrid_stack_spec(config, pattern)): use Megatron's hybrid_stack_spec for the others.")


def _mamba_layer_spec():
    """Megatron's Mamba layer spec (``hybrid_layer_specs.hybrid_stack_spec``'s, TE linear layers)."""
    require_transformer_engine("Mamba 'M' layers (Megatron's Mamba layer spec)", error=ConfigError)
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TERowParallelLinear

    return ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
            in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear)),
        mamba_bda=get_bias_dropout_add))


def local_hybrid_stack_spec(config, pattern: str = "", *, device: Optional[str] = None):
    """A ``ModuleSpec`` of Megatron's ``HybridStack`` with local layers: ``*`` a ``TransformerLayer`` holding
    the input norm and self-attention of Megatron-Core's local GPT layer, ``-`` an ``MLPLayer`` holding its pre-MLP
    norm and MLP, both norms :class:`SequenceParallelNorm`; ``M`` Megatron's TE Mamba layer.

    ``pattern``: the hybrid layer pattern the spec will build; ``device``: where it runs (default: ``"cuda"``
    when CUDA is available, else ``"cpu"``). Mamba on CPU, or any other layer symbol, is refused in one line.
    """
    require_hybrid_model()

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    layers = set(pattern) - set(_STRUCTURE)
    other = sorted(layers - set(LOCAL_SYMBOLS) - {"M"})
    if other:
        raise ConfigError(
            f"hybrid layer pattern {pattern!r}: the local hybrid spec builds attention '*', MLP '-' and (on GPUs) "
            f"Mamba 'M' layers, not {', '.join(repr(s) for s in other)}: pass Megatron's hybrid_stack_spec "
            "(megatron.core.models.hybrid.hybrid_layer_specs, needs Transformer Engine) as stack_spec.")
    mamba = IdentityOp
    if "M" in layers:
        if device != "cuda":
            raise ConfigError(
                f"hybrid layer pattern {pattern!r} has Mamba 'M' layers, which need Mamba's CUDA kernels: run on "
                "GPUs, or use attention '*' and MLP '-' layers only on CPU.")
        mamba = _mamba_layer_spec()
    layer = get_gpt_layer_local_spec(normalization=getattr(config, "normalization", "LayerNorm"))
    sub = layer.submodules
    attention = dataclasses.replace(layer, submodules=dataclasses.replace(
        sub, input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp,
        mlp_bda=IdentityFuncOp))
    mlp = ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(
        sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp,
        pre_mlp_layernorm=SequenceParallelNorm))
    return ModuleSpec(module=LocalHybridStack,
                      submodules=HybridStackSubmodules(mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp,
                                                       mtp_block_spec=_local_mtp_block_spec()))


def _local_mtp_block_spec():
    """Megatron's MTP block with local parts (``hybrid_layer_specs``'s has TE's): per depth the norms of the
    embedding (enorm), of the hidden state (hnorm) and the final one :class:`SequenceParallelNorm`, the projection
    [h; e] (2D -> D) a ``ColumnParallelLinear``; the depth's layers come from the pattern after its ``/``."""

    layer = ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
        enorm=SequenceParallelNorm, hnorm=SequenceParallelNorm, eh_proj=ColumnParallelLinear, mtp_model_layer=None,
        layer_norm=SequenceParallelNorm))
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer]))


def _check_pattern(config, pattern) -> None:
    if not isinstance(pattern, str) or not pattern.strip(_STRUCTURE):
        raise ConfigError(f"hybrid_layer_pattern must be a non-empty string of layer symbols such as '*-*-', "
                          f"got {pattern!r}.")
    main, *depths = pattern.split("/")
    if any(not d.strip("|") for d in depths):
        raise ConfigError(f"hybrid layer pattern {pattern!r}: every multi-token-prediction depth after '/' needs "
                          "layer symbols, e.g. '*-*-/*-/*-' (two depths).")
    if (getattr(config, "mtp_num_layers", None) or 0) != len(depths):
        raise ConfigError(f"hybrid layer pattern {pattern!r} declares {len(depths)} multi-token-prediction depths "
                          f"('/'), config.mtp_num_layers={getattr(config, 'mtp_num_layers', None)}: set "
                          f"mtp_num_layers={len(depths) or None}.")
    n = len(main.replace("|", ""))
    if config.num_layers != n:
        raise ConfigError(f"config.num_layers={config.num_layers} but hybrid layer pattern {pattern!r} has {n} "
                          f"layers before any '/': set num_layers={n}.")
    pp, vpp = _stages(config)
    stages = main.count("|") + 1
    if vpp > 1 and stages != pp * vpp:
        raise ConfigError(f"hybrid layer pattern {pattern!r} has {stages} pipeline segments ('|'), and "
                          f"pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size={vpp} stages "
                          "need one segment each.")
    if pp > 1 and stages > 1 and stages % pp:
        raise ConfigError(f"hybrid layer pattern {pattern!r} has {stages} pipeline segments ('|'), not a multiple "
                          f"of pipeline_model_parallel_size={pp}.")


def _stages(config):
    """(PP, VPP) of ``config`` (1 when unset)."""
    return (getattr(config, "pipeline_model_parallel_size", 1) or 1,
            getattr(config, "virtual_pipeline_model_parallel_size", None) or 1)


def default_hybrid_pattern(num_layers: int, pipeline_model_parallel_size: int = 1) -> str:
    """The plain transformer of ``num_layers`` hybrid layers, ``"*-" * (num_layers // 2)``, split into
    ``pipeline_model_parallel_size`` equal stages with ``|`` (one pair stays on one stage)."""
    if num_layers % 2:
        raise ConfigError(f"num_layers={num_layers}: a plain transformer pattern '*-*-...' has an even number of "
                          "hybrid layers (attention + MLP per block); give hybrid_layer_pattern explicitly.")
    pairs = num_layers // 2
    pp = max(1, int(pipeline_model_parallel_size))
    if pp == 1:
        return "*-" * pairs
    if pairs % pp:
        raise ConfigError(f"num_layers={num_layers} ({pairs} attention + MLP blocks) does not split into "
                          f"pipeline_model_parallel_size={pp} equal stages: give hybrid_layer_pattern with '|'.")
    return "|".join(["*-" * (pairs // pp)] * pp)


def build_hybrid_model(
    config,
    vocab_size: int,
    max_sequence_length: int,
    *,
    hybrid_layer_pattern: Optional[str] = None,
    head_rank: Optional[int] = None,
    head: "LowRankHeadConfig | HeadConfig | str | None" = None,
    stack_spec=None,
    position_embedding_type: str = "rope",
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    real_vocab_size: Optional[int] = None,
    fused_loss: "bool | FusedLossConfig" = False,
    **hybrid_kwargs,
):
    """Build a Megatron-Core ``HybridModel`` (untied embeddings) for this pipeline stage, with any registered
    head if asked: :func:`~megatron_bottleneck.models.build_gpt_model` with a layer pattern.

    ``hybrid_layer_pattern``: one symbol per layer (``*`` attention, ``-`` MLP, ``M`` Mamba on GPUs), ``|`` between
    pipeline stages (one segment per PP x VPP stage); ``config.num_layers`` must equal the number of layers.
    None: :func:`default_hybrid_pattern` (``"*-" * (num_layers // 2)``, split into PP x VPP stages), the plain
    transformer
    of ``num_layers // 2`` blocks. ``stack_spec`` defaults to :func:`local_hybrid_stack_spec` (CPU and no-TE
    capable); pass Megatron's ``hybrid_stack_spec`` for its TE layers. ``vocab_size`` must already be padded for
    TP (:func:`~megatron_bottleneck.models.padded_vocab_size`). ``head``, ``head_rank``, ``real_vocab_size`` and
    ``fused_loss`` as in ``build_gpt_model`` (the model class is then ``FusedLossHybridModel``). Other keyword
    arguments go to ``HybridModel``. Needs megatron-core >= 0.19 (one line otherwise).
    """
    hybrid_model = require_hybrid_model()
    require_transformer_engine_for_fp8(config)
    if hybrid_layer_pattern is None:
        pp, vpp = _stages(config)
        hybrid_layer_pattern = default_hybrid_pattern(config.num_layers, pp * vpp)
    _check_pattern(config, hybrid_layer_pattern)
    head, fused_from_head = prepare_head(config, vocab_size, head, head_rank)
    hybrid_kwargs.setdefault("share_embeddings_and_output_weights", False)
    pre_process, post_process = stage_ends(pre_process, post_process, vp_stage)
    if stack_spec is None:
        stack_spec = local_hybrid_stack_spec(config, hybrid_layer_pattern)
    if fused_loss:
        check_fusable(config)
    model = (fused_model_class(hybrid_model) if fused_loss else hybrid_model)(
        config=config,
        hybrid_stack_spec=stack_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        hybrid_layer_pattern=hybrid_layer_pattern,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
        **hybrid_kwargs,
    )
    return finish_head(model, head, fused_from_head, post_process, real_vocab_size, fused_loss)


LOCAL_HYBRID_STACK_SPEC = local_hybrid_stack_spec(None, "") if _HybridStack is not None else None
"""The local hybrid stack spec as one ``ModuleSpec`` object, for Megatron-LM's ``--spec MODULE NAME`` (which imports an
object, not a function): ``pretrain_hybrid.py --spec megatron_bottleneck.models.hybrid LOCAL_HYBRID_STACK_SPEC``.
Attention ``*`` and MLP ``-`` layers (:func:`local_hybrid_stack_spec` with no pattern; the layer norms follow
``config.normalization`` when built); a pattern with other layers is refused in one line when the model is built.
None on megatron-core < 0.19."""
