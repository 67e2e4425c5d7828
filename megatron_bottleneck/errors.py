"""Exceptions raised for bad user input, each with a message that says what to change."""


class BottleneckError(ValueError):
    """Base class for megatron-bottleneck's input errors."""


class HeadConfigError(BottleneckError):
    """A head cannot be built or installed with the given settings."""


class ConfigError(BottleneckError):
    """A configuration key has a bad value; the message names the key."""


class CheckpointError(BottleneckError):
    """A checkpoint cannot be loaded as asked (e.g. saved with another parallel layout)."""
