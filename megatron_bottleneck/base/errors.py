"""Exceptions for bad user input, each with a message that says what to change.

All derive from :class:`BottleneckError` (a ``ValueError``). Raised inside a rank started by
:func:`megatron_bottleneck.launch`, they reach the parent process with their type and message, and the
command line prints them as one line each. :class:`RankFailure` stands for anything else a rank raised.
"""
from typing import Dict, List


class BottleneckError(ValueError):
    """Base class for megatron-bottleneck's input errors."""


class HeadConfigError(BottleneckError):
    """A head cannot be built or installed with the given settings."""


class ConfigError(BottleneckError):
    """A configuration key has a bad value; the message names the key."""


class CheckpointError(BottleneckError):
    """A checkpoint cannot be loaded as asked (e.g. saved with another parallel layout)."""


class DataError(BottleneckError):
    """Unusable input data (missing files, vocabulary mismatch, empty split); the message says what to fix."""


class DeviceError(BottleneckError):
    """The job's devices are not what it needs (e.g. a torchrun / Slurm job that sees no GPU); the message
    says what to request, or how to ask for CPU ranks on purpose."""


class CpuModeError(BottleneckError):
    """CPU mode cannot patch this Megatron-Core: a symbol it redirects is missing (the message names it
    and the installed version)."""


class RankFailure(RuntimeError):
    """One or more ranks failed with something other than a megatron-bottleneck input error.

    ``messages``: one line per distinct failure (``rank R: Type: message``); ``tracebacks``: rank -> text.
    """

    def __init__(self, messages: List[str], tracebacks: Dict[int, str]):
        super().__init__("; ".join(messages))
        self.messages = messages
        self.tracebacks = tracebacks


def error_messages(exc: BaseException) -> List[str]:
    """The distinct one-line messages of an exception (several when ranks failed differently)."""
    return list(getattr(exc, "messages", None) or [str(exc) or type(exc).__name__])
