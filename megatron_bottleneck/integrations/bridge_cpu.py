"""Patches that let Megatron-Bridge's real ``pretrain()`` run on CPU with gloo (Bridge 0.6.2).

:func:`megatron_bottleneck.enable_cpu_mode` applies them, with the redirections inside megatron-core, whenever
``megatron.bridge`` is importable (registered as the patch set ``"megatron-bridge"``; before importing Bridge it
calls :func:`megatron_bottleneck.integrations.bridge.prepare_bridge_import`). Like the set for Megatron-LM's
``megatron/training`` (:mod:`.megatron_training_cpu`, the model followed here), each patch wraps the original
function, passes straight through when CUDA is available, and is checked before anything changes (a missing
target raises ``CpuModeError`` naming it).
"""
from __future__ import annotations

import importlib.util
from typing import List

from .megatron_training_cpu import (JIT_WARMUP_WHY, _no_cuda, _null_streams, _one_fake_device, _under_on_cpu,
                                    _wrapping, skip_built_helpers, skip_jit_warmup)
from .patching import Patch

__all__ = ["bridge_patches"]


def bridge_patches() -> List[Patch]:
    """The patches for the importable Megatron-Bridge (``megatron.bridge`` must import)."""
    patches: List[Patch] = []

    # 1. initialize_megatron asserts CUDA unless allow_no_cuda=True (setup() calls it by the name it imported).
    def make_init(original):
        def initialize_megatron(*args, **kwargs):
            if _no_cuda():
                kwargs["allow_no_cuda"] = True
            return original(*args, **kwargs)
        return initialize_megatron

    patches.append(Patch(
        "megatron.bridge.training.setup", "initialize_megatron", _wrapping(make_init),
        "initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda=True"))

    # 2. _set_random_seed seeds the TP RNG tracker only if device_count() > 0.
    patches.append(Patch(
        "megatron.bridge.training.initialize", "_set_random_seed", _under_on_cpu(_one_fake_device),
        "with torch.cuda.device_count() == 0 the tensor-parallel RNG tracker is never seeded (attention's "
        "tracker.fork() then fails); CPU mode keeps its state on a CPU generator"))

    # 3. _warmup_jit_function compiles GPU fusions on tensors drawn with device="cuda" (skip_jit_warmup).
    patches.append(Patch(
        "megatron.bridge.training.initialize", "_warmup_jit_function", _wrapping(skip_jit_warmup), JIT_WARMUP_WHY))

    # 4. Bridge's initialize imported compile_helpers by name (the core set patches megatron.core's own name).
    patches.append(Patch(
        "megatron.bridge.training.initialize", "compile_helpers", _wrapping(skip_built_helpers),
        "compile_helpers() runs `make` in megatron/core/datasets (no Makefile in the pip wheel): skipped when "
        "megatron.core.datasets.helpers_cpp already imports"))

    # 5. provide_distributed_model(use_cpu_initialization=False) -- what setup() passes by omission -- makes
    #    get_model overwrite the provider's use_cpu_initialization with False: every TP rank then draws its own
    #    shard from the TP RNG tracker (seed + 2718 + tp_rank), so TP sizes build different weights.
    def make_get_model(original):
        def get_model(model_provider, *args, **kwargs):
            if _no_cuda() and not kwargs.get("use_cpu_initialization"):
                kwargs["use_cpu_initialization"] = bool(getattr(model_provider, "use_cpu_initialization", False))
            return original(model_provider, *args, **kwargs)
        return get_model

    patches.append(Patch(
        "megatron.bridge.models.model_provider", "get_model", _wrapping(make_get_model),
        "provide_distributed_model() (as pretrain calls it) resets the provider's use_cpu_initialization to "
        "False, so TP ranks draw their own shards: on CPU the provider's own setting is kept"))

    # 6. get_model's DDP wrapping (megatron.training's _ddp_wrap, imported by name) creates a torch.cuda.Stream.
    patches.append(Patch(
        "megatron.bridge.models.model_provider", "_ddp_wrap", _under_on_cpu(_null_streams),
        "_ddp_wrap() (as Bridge's get_model imported it) creates torch.cuda.Stream() around DDP wrapping "
        "(no-op stream on CPU)"))

    # 7. GPTModelProvider's default layer spec is Transformer Engine's whatever is installed (TE needs CUDA).
    def make_spec(original):
        def transformer_engine_layer_spec(config):
            if _no_cuda() and importlib.util.find_spec("transformer_engine") is None:
                from megatron.bridge.models.gpt_provider import local_layer_spec

                return local_layer_spec(config)
            return original(config)
        return transformer_engine_layer_spec

    patches.append(Patch(
        "megatron.bridge.models.gpt_provider", "transformer_engine_layer_spec", _wrapping(make_spec),
        "GPTModelProvider's default layer spec is Transformer Engine's: on CPU without TE, Bridge's local spec"))
    return patches
