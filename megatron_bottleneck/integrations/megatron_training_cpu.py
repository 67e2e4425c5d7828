"""Patches that let Megatron-LM's ``megatron/training`` (its real ``pretrain()``) run on CPU with gloo.

:func:`megatron_bottleneck.enable_cpu_mode` applies them, with the redirections inside megatron-core,
whenever ``megatron.training`` is importable: the same one call makes Megatron-LM's real ``pretrain()`` run
on CPU/gloo. Each is a :class:`~megatron_bottleneck.integrations.patching.Patch` whose replacement wraps the
original function (no Megatron code is re-implemented) and passes straight through when CUDA is available
(except ``compile_helpers``, skipped whenever the compiled helpers import). CPU mode checks every target
before changing anything and raises ``CpuModeError`` naming a missing one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from typing import Callable, List

import torch

from .patching import Patch

__all__ = ["training_patches"]


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


@contextlib.contextmanager
def _one_fake_device():
    """``torch.cuda.device_count() == 1`` and a no-op ``set_device`` for the duration."""
    saved = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = saved


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _null_streams():
    saved = torch.cuda.Stream, torch.cuda.stream
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.Stream, torch.cuda.stream = saved


def _wrapping(make: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """``make(original) -> wrapper``, with the original's name and docstring kept."""
    return lambda original: functools.wraps(original)(make(original))


def _under_on_cpu(context: Callable) -> Callable[[Callable], Callable]:
    """A patch that runs the original inside ``context()`` when there is no CUDA, as is otherwise."""

    def make(original):
        def wrapper(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            with context():
                return original(*args, **kwargs)
        return wrapper

    return _wrapping(make)


def skip_jit_warmup(original: Callable) -> Callable:
    """``_warmup_jit_function`` that does nothing on CPU (as is with CUDA). The original pre-compiles Megatron's
    fused bias-gelu / bias-swiglu and bias-dropout-add with ``torch.compile`` on tensors it draws with
    ``device="cuda"``: on CPU that is an inductor C++ compile (about 4 s in every rank of every run, a fifth of
    a small CPU run) of functions that compile at their first use anyway, and not used at all with
    ``--no-bias-*-fusion``; its random draws (TP-dependent shapes) would also consume the CPU generator, so
    TP sizes would build different weights."""
    def _warmup_jit_function(*args, **kwargs):
        if not _no_cuda():
            return original(*args, **kwargs)
        return None
    return _warmup_jit_function


JIT_WARMUP_WHY = ("_warmup_jit_function() pre-compiles GPU fusion kernels with torch.compile (an inductor C++ "
                  "compile of ~4 s per rank on CPU) and draws TP-dependent random tensors from the CPU generator: "
                  "skipped on CPU (the fusions compile at first use), so TP=1 and TP=2 also build the same weights")


def _helpers_cpp_importable() -> bool:
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    return True


def skip_built_helpers(original: Callable) -> Callable:
    """``compile_helpers`` that returns at once when ``helpers_cpp`` already imports (the pip wheel ships it
    compiled and no Makefile), else runs the original ``make``."""
    def compile_helpers(*args, **kwargs):
        if _helpers_cpp_importable():
            return None
        return original(*args, **kwargs)
    return compile_helpers


def training_patches() -> List[Patch]:
    """The patches for the importable Megatron-LM (its ``megatron.training`` must import)."""
    patches: List[Patch] = []

    # 1. initialize_megatron asserts CUDA unless allow_no_cuda=True (pretrain calls it by the name
    #    imported into megatron.training.training).
    def make_init(original):
        def initialize_megatron(*args, **kwargs):
            if _no_cuda() and not args:
                kwargs["allow_no_cuda"] = True
            return original(*args, **kwargs)
        return initialize_megatron

    patches.append(Patch(
        "megatron.training.training", "initialize_megatron", _wrapping(make_init),
        "initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda=True"))

    # 2. _initialize_distributed builds the model-parallel groups only if device_count() > 0.
    patches.append(Patch(
        "megatron.training.initialize", "_initialize_distributed", _under_on_cpu(_one_fake_device),
        "with torch.cuda.device_count() == 0 the tensor/pipeline/data-parallel groups are never built "
        "(runs with device_count() == 1 and a no-op torch.cuda.set_device)"))

    # 3. _set_random_seed seeds the TP RNG tracker only if device_count() > 0.
    patches.append(Patch(
        "megatron.training.initialize", "_set_random_seed", _under_on_cpu(_one_fake_device),
        "with torch.cuda.device_count() == 0 the tensor-parallel RNG tracker is never seeded "
        "(attention's tracker.fork() then fails); CPU mode keeps its state on a CPU generator"))

    # 4. compile_helpers runs `make` in megatron/core/datasets; the pip wheel ships helpers_cpp
    #    compiled and no Makefile. Looked up at call time in _compile_dependencies.
    patches.append(Patch(
        "megatron.core.datasets.utils", "compile_helpers", _wrapping(skip_built_helpers),
        "compile_helpers() runs `make` in megatron/core/datasets (no Makefile in the pip wheel): "
        "skipped when megatron.core.datasets.helpers_cpp already imports (applies on GPU too)"))

    # 5. fused_kernels.load reads CUDA_HOME and runs nvcc (0.16; gone from initialize in 0.19).
    if hasattr(importlib.import_module("megatron.training.initialize"), "fused_kernels"):
        def make_fused(original):
            def load(*args, **kwargs):
                if _no_cuda():
                    return None
                return original(*args, **kwargs)
            return load

        patches.append(Patch(
            "megatron.legacy.fused_kernels", "load", _wrapping(make_fused),
            "fused_kernels.load() runs $CUDA_HOME/bin/nvcc -V (no CUDA: nothing to load)"))

    # 6. get_model creates a torch.cuda.Stream for DDP wrapping.
    patches.append(Patch(
        "megatron.training.training", "get_model", _under_on_cpu(_null_streams),
        "get_model() creates torch.cuda.Stream() around DDP wrapping (no-op stream on CPU)"))

    # 6b. 0.19 builds models from the config container in models/dist_utils.py, whose _ddp_wrap
    #     creates the stream (get_model stays for a user-given model_provider).
    if importlib.util.find_spec("megatron.training.models") is not None and \
            importlib.util.find_spec("megatron.training.models.dist_utils") is not None:
        patches.append(Patch(
            "megatron.training.models.dist_utils", "_ddp_wrap", _under_on_cpu(_null_streams),
            "_ddp_wrap() (0.19 config-container model build) creates torch.cuda.Stream() around DDP "
            "wrapping (no-op stream on CPU)"))

    # 7. validate_args asks the CUDA arch for TP > 1 / CP > 1 and then asserts
    #    CUDA_DEVICE_MAX_CONNECTIONS=1 (a GPU setting with no meaning on CPU).
    def make_arch(original):
        def get_device_arch_version(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            return 0
        return get_device_arch_version

    patches.append(Patch(
        "megatron.training.arguments", "get_device_arch_version", _wrapping(make_arch),
        "validate_args() queries the CUDA arch when TP > 1 or CP > 1, then asserts "
        "CUDA_DEVICE_MAX_CONNECTIONS=1: on CPU reports arch 0 and sets that variable if unset"))

    # 8. _warmup_jit_function compiles GPU fusions on tensors drawn with device="cuda" (skip_jit_warmup).
    patches.append(Patch(
        "megatron.training.initialize", "_warmup_jit_function", _wrapping(skip_jit_warmup), JIT_WARMUP_WHY))
    return patches
