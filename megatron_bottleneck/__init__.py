"""megatron-bottleneck: low-rank LM heads and an exact gradient-bottleneck probe for Megatron-Core.

Importing this package does not import Megatron-Core or change anything; see ``cpu.enable_cpu_mode``.
"""
from .cpu import enable_cpu_mode, is_cpu_mode, launch
from .errors import BottleneckError, CheckpointError, ConfigError, HeadConfigError
from .heads import (
    LowRankHeadConfig,
    LowRankOutputLayer,
    build_gpt_model,
    install_low_rank_head,
    low_rank_head_hook,
    padded_vocab_size,
)
from . import probe
from .parallel import destroy_parallel, initialize_parallel
from .probe import GradientProbe, ProbeConfig, wrap_forward_step
from .specs import SequenceParallelNorm, llama_block_spec, llama_config

__version__ = "0.1.0"

__all__ = [
    "enable_cpu_mode",
    "is_cpu_mode",
    "launch",
    "initialize_parallel",
    "destroy_parallel",
    "LowRankOutputLayer",
    "LowRankHeadConfig",
    "install_low_rank_head",
    "low_rank_head_hook",
    "build_gpt_model",
    "padded_vocab_size",
    "GradientProbe",
    "ProbeConfig",
    "wrap_forward_step",
    "probe",
    "SequenceParallelNorm",
    "llama_block_spec",
    "llama_config",
    "BottleneckError",
    "ConfigError",
    "CheckpointError",
    "HeadConfigError",
]
