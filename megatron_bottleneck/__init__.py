"""megatron-bottleneck: low-rank LM heads and an exact gradient-bottleneck probe for Megatron-Core.

Layers, imports going one way only (``tests/unit/test_layers.py`` enforces it):

* ``base``: errors, the head view the probe reads, head lookup, default process groups, metric sinks (torch only);
* ``ops``: the head's math kernels (torch only);
* ``heads`` and ``probe`` over those, neither importing the other; ``models`` (GPT and Hybrid builders, Llama and local hybrid specs) over heads;
* ``integrations``: CPU mode, local launch, the Megatron schedule driver, Megatron-LM, Bridge, Lightning;
* the application: ``train``, ``data``, ``sweep``, ``zoo`` / ``zoo_report`` (the head zoo benchmark), ``report``,
  ``plots``, ``measure``, ``convert`` (``convert-head``), ``evaluate``
  (zero-shot scores through lm-evaluation-harness, the ``[eval]`` extra), ``cli``.

``import megatron_bottleneck`` imports neither Megatron-Core nor anything else heavy and changes nothing:
the names below load their module on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base.errors import (BottleneckError, CheckpointError, ConfigError, CpuModeError, DataError, DeviceError,
                          HeadConfigError, RankFailure)

__version__ = "0.2.0"

_LAZY = {
    # integrations
    "enable_cpu_mode": "integrations.cpu", "disable_cpu_mode": "integrations.cpu", "cpu_mode": "integrations.cpu",
    "is_cpu_mode": "integrations.cpu", "launch": "integrations.launch",
    "initialize_parallel": "integrations.parallel", "destroy_parallel": "integrations.parallel",
    "forward_backward": "integrations.schedule", "gpt_forward_step": "integrations.schedule",
    "wrap_forward_step": "integrations.forward_step",
    # heads and models
    "LowRankOutputLayer": "heads.low_rank", "LowRankHeadConfig": "heads.install",
    "install_low_rank_head": "heads.install", "low_rank_head_hook": "heads.install",
    "enable_fused_loss": "heads.model_loss", "disable_fused_loss": "heads.model_loss", "fused_loss_hook": "heads.model_loss", "FusedLossConfig": "heads.contract",
    "DenseOutputLayer": "heads.model_loss", "as_lm_head": "heads.model_loss",
    # head plug-ins (the registry lives in base; "heads" registers the built-in kinds on import)
    "register_head": "heads", "get_head_builder": "heads", "registered_heads": "heads", "HeadConfig": "heads",
    "HeadSpec": "base.head", "HeadRegistry": "base.head", "HEADS": "base.head",
    "HeadBuildContext": "base.head", "HeadLogProb": "base.head", "NonLinearHead": "base.head",
    "LinearHead": "base.head", "check_head": "base.head", "install_head": "heads.install", "head_hook": "heads.install",
    "MixtureOfSoftmaxesHead": "heads.mos", "PointwiseLogitHead": "heads.pointwise", "StackedHead": "heads.stacked",
    "VocabParallelHead": "heads.vocab_parallel",
    "build_gpt_model": "models.gpt", "padded_vocab_size": "models.gpt",
    "build_hybrid_model": "models.hybrid", "local_hybrid_stack_spec": "models.hybrid",
    "SequenceParallelNorm": "models.llama", "llama_block_spec": "models.llama", "llama_config": "models.llama",
    # measure (the [hf] extra for HuggingFace models)
    "measure_model": "measure.run", "MeasureConfig": "measure.run",
    # probe and base
    "GradientProbe": "probe.probe", "ProbeConfig": "probe.probe",
    "HeadView": "base.head", "LMHead": "base.head", "LossRequest": "base.loss", "FusedLossRecord": "base.loss",
    "HeadLossStats": "base.loss", "LossSpec": "base.loss_spec",
    "find_head": "base.head", "MetricsLogger": "base.sinks", "read_jsonl": "base.sinks",
    "DeviceChoice": "base.device", "resolve_device": "base.device", "choose_device": "base.device",
    # application: zero-shot evaluation (lm-eval is imported only when a harness model is made)
    "evaluate_checkpoint": "evaluate.harness", "harness_model": "evaluate.harness",
    "open_checkpoint": "evaluate.scorer", "CheckpointScorer": "evaluate.scorer",
    # application: the head zoo benchmark
    "head_cost": "heads.cost", "HeadCost": "base.head", "register_head_cost": "heads.cost",
    "load_zoo": "zoo", "run_zoo": "zoo", "ZooPlan": "zoo", "write_zoo_report": "zoo_report",
    # application: a trained dense head factorised into a low-rank one (``megatron-bottleneck convert-head``)
    "convert_head": "convert",
}

__all__ = sorted(list(_LAZY) + ["BottleneckError", "CheckpointError", "ConfigError", "CpuModeError", "DataError", "DeviceError",
                                "HeadConfigError", "RankFailure", "__version__"])


_SUBPACKAGES = ("base", "ops", "heads", "probe", "models", "integrations", "train", "data", "sweep", "report", "plots",
                "measure", "evaluate", "zoo", "zoo_report", "convert", "cli")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


if TYPE_CHECKING:  # static analysers see the real names
    from .base.head import HeadView, LMHead, find_head  # noqa: F401
    from .base.loss import FusedLossRecord, HeadLossStats, LossRequest  # noqa: F401
    from .base.loss_spec import LossSpec  # noqa: F401
    from .heads.contract import FusedLossConfig  # noqa: F401
    from .heads.model_loss import (DenseOutputLayer, as_lm_head, disable_fused_loss, enable_fused_loss,  # noqa: F401
                                   fused_loss_hook)
    from .base.sinks import MetricsLogger, read_jsonl  # noqa: F401
    from .base.head import (HeadBuildContext, HeadConfig, HeadLogProb, LinearHead, NonLinearHead,  # noqa: F401
                            check_head, get_head_builder, register_head, registered_heads)
    from .heads.install import (LowRankHeadConfig, head_hook, install_head, install_low_rank_head,  # noqa: F401
                                low_rank_head_hook)
    from .heads.mos import MixtureOfSoftmaxesHead  # noqa: F401
    from .heads.pointwise import PointwiseLogitHead  # noqa: F401
    from .heads.stacked import StackedHead  # noqa: F401
    from .heads.vocab_parallel import VocabParallelHead  # noqa: F401
    from .heads.low_rank import LowRankOutputLayer  # noqa: F401
    from .integrations.cpu import cpu_mode, disable_cpu_mode, enable_cpu_mode, is_cpu_mode  # noqa: F401
    from .integrations.forward_step import wrap_forward_step  # noqa: F401
    from .integrations.launch import launch  # noqa: F401
    from .integrations.parallel import destroy_parallel, initialize_parallel  # noqa: F401
    from .integrations.schedule import forward_backward, gpt_forward_step  # noqa: F401
    from .models.gpt import build_gpt_model, padded_vocab_size  # noqa: F401
    from .models.hybrid import build_hybrid_model, local_hybrid_stack_spec  # noqa: F401
    from .models.llama import SequenceParallelNorm, llama_block_spec, llama_config  # noqa: F401
    from .probe.probe import GradientProbe, ProbeConfig  # noqa: F401
    from .measure.run import MeasureConfig, measure_model  # noqa: F401
    from .evaluate.harness import evaluate_checkpoint, harness_model  # noqa: F401
    from .evaluate.scorer import CheckpointScorer, open_checkpoint  # noqa: F401
    from .convert import convert_head  # noqa: F401
