"""Zero-shot evaluation of our checkpoints through lm-evaluation-harness (the ``[eval]`` extra).

``scorer``: log-likelihoods of token sequences under a checkpoint (one process, TP = PP = 1, CPU or GPU);
``harness``: the lm-eval ``LM`` around it and ``megatron-bottleneck eval``'s driver; ``tasks``: the default
task list. The names load their module on first use (``--help`` stays free of megatron-core).
"""
import importlib

from .tasks import DEFAULT_TASKS, EVAL_DIR, RESULTS

_LAZY = {"default_eval_dir": "harness", "evaluate_checkpoint": "harness", "harness_model": "harness",
         "CheckpointScorer": "scorer", "checkpoint_tokenizer": "scorer", "checkpoint_config": "scorer", "open_checkpoint": "scorer",
         "resolve_checkpoint": "scorer"}

__all__ = sorted(list(_LAZY) + ["DEFAULT_TASKS", "EVAL_DIR", "RESULTS"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
