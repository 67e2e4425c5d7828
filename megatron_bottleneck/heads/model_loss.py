"""A head's loss wired into Megatron's language model: a model whose forward with labels never builds the T x V
logits (formerly ``heads/fused.py``; that module name is a deprecated alias).

Two explicit classes, no method of any instance replaced:

* :class:`DenseOutputLayer`: Megatron's dense ``ColumnParallelLinear`` head implementing the head contract
  (:class:`~megatron_bottleneck.base.head.LMHead`): its fused loss runs over H itself (copied into the TP
  region, or all-gathered under sequence parallelism) and W's vocab shard. ``as_lm_head(layer)`` turns a built
  ``ColumnParallelLinear`` into one. (:class:`~megatron_bottleneck.heads.LowRankOutputLayer` implements the
  contract already: U = H B^T and A's shard.)
* :class:`FusedLossModel`: a mixin placed before a Megatron ``LanguageModule`` class (GPTModel, HybridModel):
  ``fused_model_class(GPTModel)`` is the class ``FusedLossGPTModel``. Its ``forward`` with labels hands the
  labels to the head for that one forward (a :class:`~megatron_bottleneck.heads.contract.LossContext`), the
  head returns the per-token loss ``[s, b]`` instead of logits, and the model's ``_scale_logits`` (MuP) and
  ``compute_language_model_loss`` let that loss through (``[b, s]``, as Megatron returns it). MuP's
  ``mup_output_mult`` is folded into the fused op's input. Without labels (inference) the model returns logits
  as always.

:func:`enable_fused_loss` makes a built model fused: each chunk's class becomes ``fused_model_class(type(chunk))``
(the pattern torch's ``fully_shard`` uses for its FSDP classes: ``isinstance`` checks, state dicts, hooks and
parameters are unchanged) and its dense head a :class:`DenseOutputLayer`. ``build_gpt_model(..., fused_loss=)``
builds the fused class directly. Refused in one line: Megatron's own fused cross-entropy
(``cross_entropy_loss_fusion``), Transformer Engine's MXFP8 LM head.

Multi-token prediction (``mtp_num_layers``, a HybridModel pattern with ``/``): Megatron's ``process_mtp_loss``
calls the one head once per MTP depth k before the main call, and rolls the labels left k times for depth k.
The fused model hands the head those labels (rolled by Megatron's own ``roll_tensor``, context parallelism and
packed sequences included), so every depth's loss is fused too; Megatron applies its loss mask and
``mtp_loss_scaling_factor`` as always. A depth's loss comes back as ``[s, b, 1]`` where Megatron expects
logits: Megatron's logged MTP acceptance rate (megatron-core >= 0.19, argmax of the logits) has no logits to
read under the fused loss and is meaningless there (the MTP losses are exact).

A head's ``loss_request`` (:class:`~megatron_bottleneck.base.loss.LossRequest`) says per forward whether to keep a
record of the fused pass (``record=True``, for the gradient probe); the head knows nothing of who reads it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, List, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.multi_token_prediction import roll_tensor
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.utils import get_pg_rank

from ..base.errors import HeadConfigError
from ..base.head import HeadView, find_head, is_lm_head
from ..base.loss import HeadLossStats
from .contract import FusedLossConfig, LinearLossMixin, LossContext, model_softcap, tp_region_input

try:  # megatron-core >= 0.19
    from megatron.core.inference.utils import InferenceMode
except ImportError:  # 0.16: no inference mode to ask
    InferenceMode = None

__all__ = ["FusedLossConfig", "DenseOutputLayer", "FusedLossModel", "as_lm_head", "fused_model_class",
           "enable_fused_loss", "disable_fused_loss", "fused_loss_hook", "head_loss", "is_fused"]

log = logging.getLogger("megatron_bottleneck")

_UNFUSED_FLAGS = ("cross_entropy_loss_fusion", "use_fused_lce", "use_fused_linear_cross_entropy")


class DenseOutputLayer(LinearLossMixin, ColumnParallelLinear):
    """Megatron's dense LM head (``ColumnParallelLinear``, logits = H W^T) with the head contract.

    Built like ``ColumnParallelLinear`` (plus ``real_vocab_size``), or converted from a built one by
    :func:`as_lm_head` (its parameters, buffers and hooks stay). ``vocab_size`` is the real vocabulary (default:
    the layer's full, possibly padded, output size).
    """

    def __init__(self, *args, real_vocab_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_contract(self.output_size if real_vocab_size is None else real_vocab_size)

    def logits_forward(self, input_, weight=None, runtime_gather_output=None):
        """Megatron's forward; logits c tanh(z / c) when the model config carries a final-logit softcap c
        (``final_logit_softcapping``, as Megatron-Bridge's Gemma output layer computes them)."""
        out, bias = ColumnParallelLinear.forward(self, input_, weight=weight,
                                                 runtime_gather_output=runtime_gather_output)
        cap = model_softcap(getattr(self, "config", None))
        return (out if cap is None else cap * torch.tanh(out / cap)), bias

    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return tp_region_input(hidden, self.tp_group, self.sequence_parallel)

    def loss_weight(self, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return self.weight if weight is None else weight

    def loss_bias(self, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The layer's bias shard ``[V_local]`` when its forward adds it (``bias=True``, not ``skip_bias_add``;
        Megatron's GPT / Mamba output layers have none), detached with a detached weight (MTP)."""
        if getattr(self, "bias", None) is None or self.skip_bias_add:
            return None
        return self.bias.detach() if self.params_detached else self.bias

    def probe_view(self, weight: Optional[torch.Tensor] = None) -> HeadView:
        """F = W (this rank's shard), M = I; the model config's final-logit softcap, which the unfused forward
        applies (:meth:`logits_forward`)."""
        w = (self.weight if weight is None else weight).detach()
        return HeadView(factor=w, mix=None, vocab_start=get_pg_rank(self.tp_group) * w.shape[0],
                        vocab_size=self.vocab_size, softcap=model_softcap(getattr(self, "config", None)))


def as_lm_head(layer, vocab_size: Optional[int] = None):
    """``layer`` as an :class:`~megatron_bottleneck.base.head.LMHead`: a head that implements it is returned
    as it is (``vocab_size`` recorded when given); a Megatron ``ColumnParallelLinear`` becomes a
    :class:`DenseOutputLayer` in place. Anything else is refused in one line."""
    if is_lm_head(layer):
        if vocab_size is not None:
            layer.vocab_size = int(vocab_size)
        return layer
    capped = isinstance(layer, ColumnParallelLinear) and model_softcap(getattr(layer, "config", None)) is not None
    if type(layer) is not ColumnParallelLinear and not capped:
        raise HeadConfigError(
            f"the LM head is a {type(layer).__name__}, which the fused loss cannot drive: it needs Megatron's "
            "ColumnParallelLinear or a head implementing megatron_bottleneck.base.head.LMHead "
            "(Transformer Engine's MXFP8 LM head: turn the MXFP8 output projection off).")
    layer.__class__ = DenseOutputLayer
    layer._init_contract(layer.output_size if vocab_size is None else vocab_size)
    return layer


class FusedLossModel:
    """Mixin for a Megatron ``LanguageModule``: the forward with labels computes the loss fused with the head.

    ``fused_loss_config`` (:class:`FusedLossConfig`) holds the options. See the module docstring.
    """

    fused_loss_config: FusedLossConfig = FusedLossConfig()

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
        head = getattr(self, "output_layer", None) if getattr(self, "post_process", True) else None
        if labels is None or head is None:
            return super().forward(*args, **kwargs)
        config = self.config
        scale = float(getattr(config, "mup_output_mult", 1.0)) if getattr(config, "use_mup", False) else 1.0
        head.loss_context = LossContext(labels.transpose(0, 1).contiguous(), self.fused_loss_config, scale,
                                        bool(getattr(config, "gradient_accumulation_fusion", False)),
                                        mtp_labels=self._mtp_labels(labels, args, kwargs))
        try:
            return super().forward(*args, **kwargs)
        finally:
            head.loss_context = None

    def _mtp_labels(self, labels, args, kwargs) -> List[torch.Tensor]:
        """The labels ``[s, b]`` of MTP depths 1..n on this stage (none without MTP): ``labels`` ``[b, s]`` rolled
        left k times by Megatron's ``roll_tensor``, as ``process_mtp_loss`` rolls them."""
        n = int(getattr(self.config, "mtp_num_layers", None) or 0) if getattr(self, "mtp_process", False) else 0
        if not n or _inference_mode_active():  # Megatron runs no MTP depth in inference (megatron-core >= 0.19)
            return []
        packed = kwargs.get("packed_seq_params")
        if packed is None:
            packed = next((a for a in args if isinstance(a, PackedSeqParams)), None)
        pg = getattr(self, "pg_collection", None)
        cp_group = getattr(pg, "cp", None) if pg is not None else getattr(self, "cp_group", None)
        out, rolled = [], labels
        for _ in range(n):
            rolled, _ = roll_tensor(rolled, shifts=-1, dims=-1, cp_group=cp_group, packed_seq_params=packed)
            out.append(rolled.transpose(0, 1).contiguous())
        return out

    def _fused_output(self, tensor) -> bool:
        ctx = getattr(getattr(self, "output_layer", None), "loss_context", None)
        return ctx is not None and ctx.output is not None and tensor is ctx.output

    def _scale_logits(self, logits):
        if self._fused_output(logits):  # the scale is already inside the fused loss
            return logits
        return super()._scale_logits(logits)

    def compute_language_model_loss(self, labels, logits):
        if self._fused_output(logits):  # [s, b] (an MTP depth's [s, b, 1]) -> [b, s], as Megatron returns it
            return logits.reshape(logits.shape[0], logits.shape[1]).transpose(0, 1).contiguous()
        return super().compute_language_model_loss(labels, logits)


def _inference_mode_active() -> bool:
    """megatron-core >= 0.19's ``InferenceMode.is_active()`` (0.16 has none: False)."""
    return InferenceMode is not None and bool(InferenceMode.is_active())


def fused_model_class(cls: type) -> type:
    """``FusedLoss<cls>``: the subclass of a Megatron language-model class with :class:`FusedLossModel` first,
    e.g. ``fused_model_class(GPTModel)(config=..., ...)``. One per class: an existing one is found among
    ``FusedLossModel.__subclasses__()`` (Python's own record of the subclasses; no cache of ours)."""
    if issubclass(cls, FusedLossModel):
        return cls
    for sub in FusedLossModel.__subclasses__():
        if sub.__bases__ == (FusedLossModel, cls):
            return sub
    return type(f"FusedLoss{cls.__name__}", (FusedLossModel, cls),
                {"__module__": __name__, "__doc__": f"{cls.__name__} with the fused head loss."})


def _language_module(chunk):
    inner = chunk
    while not hasattr(inner, "compute_language_model_loss") and isinstance(getattr(inner, "module", None),
                                                                           torch.nn.Module):
        inner = inner.module
    return inner if hasattr(inner, "compute_language_model_loss") else None


def check_fusable(config) -> None:
    """One-line refusals for model settings the fused head loss cannot honour."""
    for flag in _UNFUSED_FLAGS:
        if getattr(config, flag, False):
            raise HeadConfigError(
                f"the fused head loss replaces Megatron's cross-entropy, but {flag}=True selects Megatron's own "
                f"fused cross-entropy: set {flag}=False (Megatron-LM: drop --{flag.replace('_', '-')}; "
                f"Megatron-Bridge: model.{flag}=False).")


def enable_fused_loss(model, config: Optional[FusedLossConfig] = None):
    """Make ``model``'s forward with labels use the fused head + loss (on every chunk that holds the head).

    ``model``: a Megatron-Core language model or a list of (virtual pipeline) chunks, before or after DDP
    wrapping. Idempotent (a second call updates the options); returns ``model``.
    """
    config = config or FusedLossConfig()
    for chunk in (list(model) if isinstance(model, (list, tuple)) else [model]):
        head = find_head(chunk)
        inner = _language_module(chunk)
        if head is None or inner is None:
            continue
        check_fusable(inner.config)
        config.check_model_path(as_lm_head(head).vocab_size)
        inner.__class__ = fused_model_class(type(inner))
        cap = model_softcap(inner.config)  # Megatron-Bridge's Gemma: final_logit_softcapping, unless set here
        inner.fused_loss_config = replace(config, softcap=cap) if cap and config.softcap is None else config
    return model


def fused_loss_hook(config: Optional[FusedLossConfig] = None) -> Callable[[List], List]:
    """A pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]`` making every chunk that holds the head
    compute its loss fused with it (:func:`enable_fused_loss`), e.g. Megatron-Bridge's
    ``config.model.register_pre_wrap_hook(mb.fused_loss_hook())`` after ``mb.low_rank_head_hook(r)``.

    Megatron's own fused cross-entropy (``cross_entropy_loss_fusion``, on by default in Megatron-Bridge) is
    turned off on the model's config with one warning line, since the fused head loss replaces it; the other
    refusals of :func:`check_fusable` stand."""

    def hook(models: List) -> List:
        for chunk in models:
            inner = _language_module(chunk)
            model_config = getattr(inner, "config", None)
            if find_head(chunk) is None or model_config is None:
                continue
            if getattr(model_config, "cross_entropy_loss_fusion", False):
                model_config.cross_entropy_loss_fusion = False
                log.warning("megatron-bottleneck: cross_entropy_loss_fusion=True turned off: the fused head loss "
                            "replaces Megatron's fused cross-entropy (set it False yourself to silence this).")
        enable_fused_loss(models, config)
        return models

    return hook


def disable_fused_loss(model) -> None:
    """Undo :func:`enable_fused_loss` (the model's class back to its own; the head keeps the contract)."""
    for chunk in (list(model) if isinstance(model, (list, tuple)) else [model]):
        inner = _language_module(chunk)
        if inner is not None and isinstance(inner, FusedLossModel):
            inner.__class__ = next(c for c in type(inner).__mro__[1:]
                                   if c is not FusedLossModel and not issubclass(c, FusedLossModel))


def is_fused(model) -> bool:
    """Whether some chunk of ``model`` computes its loss with the fused head."""
    return any(isinstance(_language_module(c), FusedLossModel)
               for c in (list(model) if isinstance(model, (list, tuple)) else [model]))


def head_loss(head, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
              config: Optional[FusedLossConfig] = None, stats: Optional[HeadLossStats] = None) -> torch.Tensor:
    """Per-token cross-entropy ``[s, b]`` of any head's logits for ``hidden`` and ``labels`` ``[s, b]``, without
    the ``[s, b, V/tp]`` logits: ``as_lm_head(head).loss(...)``."""
    return as_lm_head(head).loss(hidden, labels, weight, config=config, stats=stats)
