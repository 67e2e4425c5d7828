"""What the probe reads of an LM head, and the one way to find the head of a model.

A *head* is any module with Megatron's output-layer contract (``forward(hidden, weight=None, ...) ->
(logits, bias)`` or plain ``logits``) whose logits are linear in its weight. The probe needs only a
:class:`HeadView` of it on each tensor-parallel rank: a basis factor F of W's column space (the local vocab
shard) and a mix M with W = F M. Heads expose it through ``probe_view(weight=None, vocab_size=None)``;
dense heads (``weight`` of shape ``(V/tp, D)``) get a default view from the probe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["HeadView", "find_head"]


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
