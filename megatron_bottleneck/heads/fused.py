"""Deprecated name of :mod:`megatron_bottleneck.heads.model_loss` (a head's loss wired into Megatron's model).

Importing it gives one :class:`DeprecationWarning`; every name resolves to ``model_loss``'s."""
from ..base.deprecation import warn_deprecated
from . import model_loss as _model_loss
from .model_loss import *  # noqa: F401,F403
from .model_loss import __all__  # noqa: F401

warn_deprecated("megatron_bottleneck.heads.fused", "megatron_bottleneck.heads.model_loss", stacklevel=2)


def __getattr__(name: str):
    return getattr(_model_loss, name)
