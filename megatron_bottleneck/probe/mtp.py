"""Multi-token prediction: which of the shared head's calls per model forward the probe measures."""
from __future__ import annotations

from typing import Optional

import torch

from ..base.errors import ConfigError
from ..base.head import is_lm_head

__all__ = ["MTPSelector"]


class MTPSelector:
    """Megatron calls the shared head once per MTP depth 1..n, then for the main loss, in every forward
    (``process_mtp_loss``). A forward pre-hook on the model holding the head restarts the count of head calls, so
    the probe's head hooks measure only the call of ``depth`` (0 the main head, k in 1..n MTP depth k)."""

    def __init__(self, model, head: torch.nn.Module, depth: int):
        holder = self.holder(model, head)
        depths = 0
        if holder is not None and getattr(holder, "mtp_process", False):
            depths = int(getattr(holder.config, "mtp_num_layers", None) or 0)
        if depth > depths:
            raise ConfigError(f"probe.mtp_depth={depth}, but the model has {depths} multi-token "
                              f"prediction depths on this stage: set probe.mtp_depth between 0 and {depths}.")
        self.depth = depth
        self.depths = depths  # MTP depths per model forward (the head is called n + 1 times: depths 1..n, main)
        self.call = 0  # index of the head's call within the current model forward
        self.measured = True  # the current head call is the one ``depth`` names
        self.handle = holder.register_forward_pre_hook(self._model_forward_starts) if depths else None

    @staticmethod
    def holder(model, head) -> Optional[torch.nn.Module]:
        """The module (of ``model``, a module or list of chunks, through wrappers' ``.module``) whose
        ``output_layer`` is ``head``."""
        for chunk in (list(model) if isinstance(model, (list, tuple)) else [model]):
            inner = chunk
            while getattr(inner, "output_layer", None) is not head and isinstance(getattr(inner, "module", None),
                                                                                 torch.nn.Module):
                inner = inner.module
            if getattr(inner, "output_layer", None) is head:
                return inner
        return None

    def _model_forward_starts(self, module, args) -> None:
        self.call = 0
        return None

    def count_call(self, head: torch.nn.Module) -> bool:
        """Count this head call (MTP depth i + 1 for call i < n, the main head for call n) and say whether it is the
        depth the probe measures; a call it skips keeps no fused record."""
        i = self.call
        self.call += 1
        self.measured = (i + 1 if i < self.depths else 0) == self.depth
        if not self.measured and is_lm_head(head):
            head.loss_request.record = False
        return self.measured
