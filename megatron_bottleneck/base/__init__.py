"""The torch-only base every other layer builds on: errors, the head view and head lookup, default
process groups, metrics sinks, the device decision."""
from .device import DeviceChoice, auto_dtype, choose_device, resolve_device
from .errors import (BottleneckError, CheckpointError, ConfigError, CpuModeError, DataError, DeviceError, HeadConfigError,
                     RankFailure, error_messages)
from .groups import default_dp_cp_group, default_dp_group, default_tp_group
from .head import (HeadBuildContext, HeadConfig, HeadLogProb, HeadSpec, HeadView, LinearHead, LMHead, NonLinearHead,
                   check_head, find_head, get_head_builder, head_view, is_linear_head, is_lm_head, is_nonlinear_head,
                   register_head, registered_heads)
from .loss import FusedLossRecord, HeadLossStats, LossRequest
from .loss_spec import LossSpec
from .sinks import MetricsLogger, read_jsonl

__all__ = ["BottleneckError", "CheckpointError", "ConfigError", "CpuModeError", "DataError", "DeviceError", "HeadConfigError",
           "RankFailure", "error_messages",
           "HeadView", "LMHead", "find_head", "head_view", "is_lm_head", "FusedLossRecord", "HeadLossStats", "LossSpec",
           "HeadBuildContext", "HeadConfig", "HeadLogProb", "HeadSpec", "LinearHead", "NonLinearHead", "check_head",
           "get_head_builder", "is_linear_head", "is_nonlinear_head", "register_head", "registered_heads",
           "LossRequest", "DeviceChoice", "resolve_device", "choose_device", "auto_dtype",
           "default_tp_group", "default_dp_group", "default_dp_cp_group", "MetricsLogger", "read_jsonl"]
