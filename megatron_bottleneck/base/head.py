"""The head contract: what the gradient probe and the fused loss read of an LM head, and the one way to
find the head of a model.

A *head* is any module with Megatron's output-layer contract (``forward(hidden, weight=None,
runtime_gather_output=None) -> (logits, bias)``) whose logits are linear in its weight: logits
``[s, b, V/tp]`` = H W_local^T, vocab-parallel over the tensor-parallel group. What the rest of the package
reads of it is the typed protocol :class:`LMHead`:

* ``probe_view(weight=None) -> HeadView``: a basis factor F of col(W) (the local vocab shard) and a mix M with
  W = F M, plus the real vocabulary, for the probe's exact figures;
* ``vocab_size``: the real (unpadded) vocabulary V; rows at global index >= V are Megatron's padding;
* ``loss(hidden, labels, weight=None, *, config=None, stats=None, logit_scale=1.0) -> [s, b]``: the per-token
  cross-entropy fused with the head (no ``[s, b, V/tp]`` logits), through ``megatron_bottleneck.ops``;
* ``loss_request`` (:class:`~megatron_bottleneck.base.loss.LossRequest`): what its next forward with labels
  must produce (the logits, or the fused loss and a record of it), set by a reader before the forward;
* ``last_loss`` (:class:`~megatron_bottleneck.base.loss.FusedLossRecord` or None): its last fused pass's
  per-token statistics and inputs, kept when ``loss_request.record`` was set;
* ``tp_group`` and ``sequence_parallel`` as on Megatron's ``ColumnParallelLinear``.

:class:`megatron_bottleneck.heads.LowRankOutputLayer` and :class:`megatron_bottleneck.heads.DenseOutputLayer`
implement it; a new head type is one module implementing it (``megatron_bottleneck.heads.contract`` has the
shared fused-forward logic). A plain Megatron ``ColumnParallelLinear`` (or ``torch.nn.Linear``) head that does
not implement it is still probed: :func:`head_view` gives it the dense view (F = W, M = I).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .loss import FusedLossRecord, LossRequest

__all__ = ["HeadView", "LMHead", "find_head", "head_view", "is_lm_head"]


@dataclass
class HeadView:
    """A head on this TP rank, as the probe sees it: ``col(W) = col(basis)`` and ``W = basis @ mix``.

    basis: F, the local vocab shard, ``(V_local, k)``. mix: M, ``(k, D)``, replicated over TP; None stands
    for the identity (dense head, k = D). vocab_start: global vocabulary index of basis row 0.
    vocab_size: the real (unpadded) V; rows at global index >= vocab_size are padding.
    """

    basis: torch.Tensor
    mix: Optional[torch.Tensor]
    vocab_start: int
    vocab_size: int

    def valid_rows(self) -> int:
        """Rows of ``basis`` that are real vocabulary (the rest is Megatron's padding)."""
        return int(max(0, min(self.basis.shape[0], self.vocab_size - self.vocab_start)))


@runtime_checkable
class LMHead(Protocol):
    """The head contract (see the module docstring). Shapes: hidden ``[s, b, D]`` (``[s/tp, b, D]`` under
    sequence parallelism), labels ``[s, b]``, loss ``[s, b]`` float32."""

    tp_group: Any
    sequence_parallel: bool
    vocab_size: int
    loss_request: LossRequest
    last_loss: Optional[FusedLossRecord]

    def probe_view(self, weight: Optional[torch.Tensor] = None) -> "HeadView":
        """The probe's view of this rank's shard; ``weight`` is the one passed to forward, if any."""

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
             config: Any = None, stats: Any = None, logit_scale: float = 1.0) -> torch.Tensor:
        """Per-token cross-entropy ``[s, b]`` of ``logit_scale`` x this head's logits, never building them."""


def is_lm_head(module) -> bool:
    """Whether ``module`` implements :class:`LMHead` (attributes and methods present)."""
    return isinstance(module, LMHead)


def head_view(head, weight: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> "HeadView":
    """The probe's view of any head: its own ``probe_view`` when it implements :class:`LMHead`, else the dense
    view of a module whose ``weight`` is the local vocab shard ``(V/tp, D)`` (Megatron's
    ``ColumnParallelLinear``, ``torch.nn.Linear``). ``vocab_size`` overrides the real vocabulary."""
    if is_lm_head(head):
        view = head.probe_view(weight=weight)
    else:
        w = head.weight if weight is None else weight
        group = getattr(head, "tp_group", None)
        rank, size = _group_rank_size(group)
        rows = w.shape[0]
        view = HeadView(basis=w.detach(), mix=None, vocab_start=rank * rows,
                        vocab_size=int(getattr(head, "output_size", rows * size)))
    if vocab_size is not None:
        view = HeadView(view.basis, view.mix, view.vocab_start, int(vocab_size))
    return view


def _group_rank_size(group):
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Through wrappers that keep the model in ``.module`` (Megatron DDP, Float16Module, FSDP)."""
    while not hasattr(module, "output_layer") and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


def find_head(model) -> Optional[torch.nn.Module]:
    """The LM head (``output_layer``) of a model, a wrapped model or a list of model chunks.

    Looks through wrappers that hold the model in ``.module``; for a list of (virtual pipeline) chunks takes
    the last chunk that holds a head. Returns None where this rank holds no head (a chunk built with
    ``post_process=False``). A module without an ``output_layer`` of its own (e.g. a LightningModule holding
    a Megatron model) is searched for the first submodule that has one.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in reversed(chunks):
        m = _unwrap(chunk)
        if not hasattr(m, "output_layer") and isinstance(m, torch.nn.Module):
            m = next((sub for sub in m.modules() if hasattr(sub, "output_layer")), m)
        if getattr(m, "post_process", True) is False:
            continue
        head = getattr(m, "output_layer", None)
        if head is not None:
            return head
    return None
