"""The LM head fused with its loss: GPTModel's forward with labels never builds the T x V logits.

:func:`head_loss` is the per-token cross-entropy of any head with Megatron's output-layer contract, through
:func:`megatron_bottleneck.ops.linear_cross_entropy` (vocab chunks, online log-sum-exp, recomputing
backward; vocab-parallel over TP; padded vocabulary excluded):

* a :class:`~megatron_bottleneck.heads.LowRankOutputLayer` (W = A B): its :meth:`loss` (U = H B^T, all-gathered
  under sequence parallelism as in its forward, then the fused op over A's vocab shard);
* a dense head (Megatron's ``ColumnParallelLinear``, B = I): H itself (copied into the TP region, or gathered
  under sequence parallelism), then the fused op over W's vocab shard.

The TP region supplies the all-reduce (reduce-scatter under SP) of dL/dU, exactly as for the unfused head.

:func:`enable_fused_loss` is the switch for a built model (GPTModel or any Megatron ``LanguageModule`` with an
``output_layer``): with ``labels`` its forward returns the same per-token loss ``[b, s]`` as before, computed
by :func:`head_loss`; without labels (inference) it returns logits as always. The head also honours, per call:

* ``head.materialize_logits = True``: build the logits this time (the unfused path), e.g. for a measurement
  that needs them;
* ``head.collect_loss_stats = True``: keep the fused pass's :class:`~megatron_bottleneck.ops.HeadLossStats`
  (per token sum_i p_i^2, p_y, lse) in ``head.last_loss_stats``, with the loss tensor it belongs to in
  ``head.last_fused_loss``. Anything that needs ||dL/dz||^2 reads it from there (the gradient probe does);
  the head knows nothing of who reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.errors import HeadConfigError
from ..base.head import find_head
from ..ops import HeadLossStats, linear_cross_entropy
from .low_rank import LowRankOutputLayer

__all__ = ["FusedLossConfig", "head_loss", "enable_fused_loss", "disable_fused_loss"]


@dataclass
class FusedLossConfig:
    """Options of the fused head + loss."""

    label_smoothing: float = 0.0
    """alpha in [0, 1): Megatron's label smoothing over the real vocabulary."""
    z_loss_weight: float = 0.0
    """w >= 0: adds w lse^2 per token (PaLM's z-loss)."""
    memory_budget_mib: Optional[float] = None
    """Working memory of the chunk loop (the vocabulary chunk is chosen to fit it); None: 16 MiB on CPUs,
    64 MiB on GPUs (``ops.default_memory_budget``)."""
    fp8: Optional[Literal["e4m3"]] = None
    """e4m3: the head's GEMMs in FP8 through ``torch._scaled_mm`` (opt-in; tokens and width multiples of 16)."""


def _dense_input(head, hidden: torch.Tensor) -> torch.Tensor:
    """A dense head's fused-op input: H over the full sequence, in the TP region (as its forward does)."""
    tp_group = getattr(head, "tp_group", None)
    if getattr(head, "sequence_parallel", False) and get_pg_size(tp_group) > 1:
        return gather_from_sequence_parallel_region(hidden, group=tp_group)
    if get_pg_size(tp_group) > 1:
        return copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    return hidden


def head_loss(head, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None,
              config: Optional[FusedLossConfig] = None, stats: Optional[HeadLossStats] = None) -> torch.Tensor:
    """Per-token cross-entropy ``[s, b]`` of ``head``'s logits for ``hidden`` ``[s, b, D]`` (``[s/tp, b, D]``
    under sequence parallelism) and ``labels`` ``[s, b]``, without the ``[s, b, V/tp]`` logits.

    ``weight`` overrides the head's (vocab-sharded) weight as in its forward; the real vocabulary is
    ``head.real_vocab_size`` when set (padded rows excluded), else the head's full size.
    """
    config = config or FusedLossConfig()
    options = dict(label_smoothing=config.label_smoothing, z_loss_weight=config.z_loss_weight,
                   memory_budget_bytes=(None if config.memory_budget_mib is None
                                        else int(config.memory_budget_mib * 2 ** 20)), fp8=config.fp8, stats=stats)
    if isinstance(head, LowRankOutputLayer):
        return head.loss(hidden, labels, weight, **options)
    w = head.weight if weight is None else weight
    if w is None:
        raise HeadConfigError("the head has no weight of its own (tied embeddings): pass weight= to head_loss.")
    tp_group = getattr(head, "tp_group", None)
    rows = w.shape[0]
    vocab = getattr(head, "real_vocab_size", None) or rows * get_pg_size(tp_group)
    return linear_cross_entropy(_dense_input(head, hidden), w, labels, tp_group=tp_group,
                                vocab_start=get_pg_rank(tp_group) * rows, vocab_size=vocab, check_labels=False,
                                **options)


class _FusedHead:
    """Replaces ``head.forward`` on the instance: the fused loss while the model holds labels."""

    def __init__(self, model, head, config: FusedLossConfig):
        self.model, self.head, self.config = model, head, config
        self.labels: Optional[torch.Tensor] = None
        self.original_forward = head.forward
        self.original_loss = model.compute_language_model_loss
        self.handles = [model.register_forward_pre_hook(self._capture_labels, with_kwargs=True),
                        model.register_forward_hook(self._release_labels)]
        head.forward = self.forward
        model.compute_language_model_loss = self.compute_language_model_loss

    def _capture_labels(self, _module, args, kwargs):
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
        self.labels = labels
        return None

    def _release_labels(self, *_):
        self.labels = None

    def forward(self, input_, weight=None, runtime_gather_output=None):
        head = self.head
        if self.labels is None or getattr(head, "materialize_logits", False):
            return self.original_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        stats = HeadLossStats() if getattr(head, "collect_loss_stats", False) else None
        loss = head_loss(head, input_, self.labels.transpose(0, 1).contiguous(), weight, self.config, stats)
        head.last_fused_loss, head.last_loss_stats = loss, stats
        return loss, None

    def compute_language_model_loss(self, labels, logits):
        if logits is getattr(self.head, "last_fused_loss", None):
            return logits.transpose(0, 1).contiguous()  # [s, b] -> [b, s], as Megatron returns it
        return self.original_loss(labels, logits)

    def remove(self):
        for h in self.handles:
            h.remove()
        del self.head.forward  # the class's forward again
        del self.model.compute_language_model_loss


def enable_fused_loss(model, config: Optional[FusedLossConfig] = None):
    """Make ``model``'s forward with labels use :func:`head_loss` (on every chunk that holds the head).

    ``model``: a Megatron-Core language model or a list of (virtual pipeline) chunks, before or after DDP
    wrapping. Idempotent; returns ``model``. Multi-token prediction is refused (its heads read the logits).
    """
    config = config or FusedLossConfig()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        head = find_head(chunk)
        if head is None:
            continue
        inner = chunk
        while not hasattr(inner, "compute_language_model_loss") and hasattr(inner, "module"):
            inner = inner.module
        if getattr(inner, "_fused_head", None) is not None:
            continue
        if getattr(getattr(inner, "config", None), "mtp_num_layers", None):
            raise HeadConfigError("the fused head loss does not support multi-token prediction (mtp_num_layers): "
                                  "disable one of them.")
        inner._fused_head = _FusedHead(inner, head, config)
    return model


def disable_fused_loss(model) -> None:
    """Undo :func:`enable_fused_loss`."""
    for chunk in (list(model) if isinstance(model, (list, tuple)) else [model]):
        inner = chunk
        while not hasattr(inner, "_fused_head") and hasattr(inner, "module"):
            inner = inner.module
        fused = getattr(inner, "_fused_head", None)
        if fused is not None:
            fused.remove()
            inner._fused_head = None
