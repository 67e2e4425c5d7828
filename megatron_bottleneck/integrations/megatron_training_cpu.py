"""Patches that let Megatron-LM's ``megatron/training`` (its real ``pretrain()``) run on CPU with gloo.

Together with :func:`megatron_bottleneck.cpu.enable_cpu_mode` (which redirects the CUDA calls inside
megatron-core), the patches below handle the places in ``megatron/training`` that stop a CPU run.
Each is a :class:`TrainingPatch` record ``(module_name, attribute_name, replacement, why)``; the
replacement wraps the original function (no Megatron code is re-implemented) and is a no-op
pass-through when CUDA is available, except where noted.

:func:`training_cpu_patches` returns the records (empty when ``megatron.training`` is not
importable); :func:`apply_training_cpu_patches` sets them (keeping the originals) and
:func:`undo_training_cpu_patches` restores them. A missing target raises ``RuntimeError`` naming the
megatron-core version.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "TrainingPatch",
    "training_cpu_patches",
    "apply_training_cpu_patches",
    "undo_training_cpu_patches",
    "megatron_training_available",
]


class TrainingPatch(NamedTuple):
    module_name: str
    attribute_name: str
    replacement: Any
    why: str


def megatron_training_available() -> bool:
    """True when Megatron-LM's ``megatron.training`` package is importable."""
    try:
        import megatron.training.training  # noqa: F401
    except Exception:
        return False
    return True


def _mcore_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:
        return "unknown"


def _target(module_name: str, attribute_name: str, *, optional: bool = False):
    """(module, original attribute) or raise a one-line error naming the megatron-core version."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if optional:
            return None, None
        raise RuntimeError(
            f"megatron-bottleneck CPU patch: cannot import {module_name} ({exc}) with megatron-core "
            f"{_mcore_version()}; this Megatron-LM version is not supported."
        ) from None
    if not hasattr(module, attribute_name):
        if optional:
            return module, None
        raise RuntimeError(
            f"megatron-bottleneck CPU patch: {module_name}.{attribute_name} not found with megatron-core "
            f"{_mcore_version()}; this Megatron-LM version is not supported."
        )
    return module, getattr(module, attribute_name)


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


def _wrap(original: Callable, make: Callable[[Callable], Callable]) -> Callable:
    wrapper = functools.wraps(original)(make(original))
    wrapper.__megatron_bottleneck_original__ = original
    return wrapper


def _helpers_cpp_importable() -> bool:
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    return True


def training_cpu_patches() -> List[TrainingPatch]:
    """The patches for this Megatron-LM, or ``[]`` when ``megatron.training`` is not importable."""
    if not megatron_training_available():
        return []
    patches: List[TrainingPatch] = []

    # 1. initialize_megatron asserts CUDA unless allow_no_cuda=True (pretrain calls it by the name
    #    imported into megatron.training.training).
    _, orig = _target("megatron.training.training", "initialize_megatron")

    def make_init(original):
        def initialize_megatron(*args, **kwargs):
            if _no_cuda() and not args:
                kwargs["allow_no_cuda"] = True
            return original(*args, **kwargs)
        return initialize_megatron

    patches.append(TrainingPatch(
        "megatron.training.training", "initialize_megatron", _wrap(orig, make_init),
        "initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda=True"))

    # 2. _initialize_distributed builds the model-parallel groups only if device_count() > 0.
    _, orig = _target("megatron.training.initialize", "_initialize_distributed")

    def make_dist(original):
        def _initialize_distributed(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            with _one_fake_device():
                return original(*args, **kwargs)
        return _initialize_distributed

    patches.append(TrainingPatch(
        "megatron.training.initialize", "_initialize_distributed", _wrap(orig, make_dist),
        "with torch.cuda.device_count() == 0 the tensor/pipeline/data-parallel groups are never built "
        "(runs with device_count() == 1 and a no-op torch.cuda.set_device)"))

    # 3. _set_random_seed seeds the TP RNG tracker only if device_count() > 0.
    _, orig = _target("megatron.training.initialize", "_set_random_seed")

    def make_seed(original):
        def _set_random_seed(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            with _one_fake_device():
                return original(*args, **kwargs)
        return _set_random_seed

    patches.append(TrainingPatch(
        "megatron.training.initialize", "_set_random_seed", _wrap(orig, make_seed),
        "with torch.cuda.device_count() == 0 the tensor-parallel RNG tracker is never seeded "
        "(attention's tracker.fork() then fails); CPU mode keeps its state on a CPU generator"))

    # 4. compile_helpers runs `make` in megatron/core/datasets; the pip wheel ships helpers_cpp
    #    compiled and no Makefile. Looked up at call time in _compile_dependencies.
    _, orig = _target("megatron.core.datasets.utils", "compile_helpers")

    def make_helpers(original):
        def compile_helpers(*args, **kwargs):
            if _helpers_cpp_importable():
                return None
            return original(*args, **kwargs)
        return compile_helpers

    patches.append(TrainingPatch(
        "megatron.core.datasets.utils", "compile_helpers", _wrap(orig, make_helpers),
        "compile_helpers() runs `make` in megatron/core/datasets (no Makefile in the pip wheel): "
        "skipped when megatron.core.datasets.helpers_cpp already imports (applies on GPU too)"))

    # 5. fused_kernels.load reads CUDA_HOME and runs nvcc (0.16; gone from initialize in 0.19).
    init_mod = importlib.import_module("megatron.training.initialize")
    if hasattr(init_mod, "fused_kernels"):
        _, orig = _target("megatron.legacy.fused_kernels", "load")

        def make_fused(original):
            def load(*args, **kwargs):
                if _no_cuda():
                    return None
                return original(*args, **kwargs)
            return load

        patches.append(TrainingPatch(
            "megatron.legacy.fused_kernels", "load", _wrap(orig, make_fused),
            "fused_kernels.load() runs $CUDA_HOME/bin/nvcc -V (no CUDA: nothing to load)"))

    # 6. get_model creates a torch.cuda.Stream for DDP wrapping.
    _, orig = _target("megatron.training.training", "get_model")

    def make_get_model(original):
        def get_model(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            with _null_streams():
                return original(*args, **kwargs)
        return get_model

    patches.append(TrainingPatch(
        "megatron.training.training", "get_model", _wrap(orig, make_get_model),
        "get_model() creates torch.cuda.Stream() around DDP wrapping (no-op stream on CPU)"))

    # 6b. 0.19 builds models from the config container in models/dist_utils.py, whose _ddp_wrap
    #     creates the stream (get_model stays for a user-given model_provider).
    try:
        importlib.import_module("megatron.training.models.dist_utils")
        has_dist_utils = True
    except ImportError:
        has_dist_utils = False
    if has_dist_utils:
        _, orig = _target("megatron.training.models.dist_utils", "_ddp_wrap")
        patches.append(TrainingPatch(
            "megatron.training.models.dist_utils", "_ddp_wrap", _wrap(orig, make_get_model),
            "_ddp_wrap() (0.19 config-container model build) creates torch.cuda.Stream() around DDP "
            "wrapping (no-op stream on CPU)"))

    # 7. validate_args asks the CUDA arch for TP > 1 / CP > 1 and then asserts
    #    CUDA_DEVICE_MAX_CONNECTIONS=1 (a GPU setting with no meaning on CPU).
    _, orig = _target("megatron.training.arguments", "get_device_arch_version")

    def make_arch(original):
        def get_device_arch_version(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
            return 0
        return get_device_arch_version

    patches.append(TrainingPatch(
        "megatron.training.arguments", "get_device_arch_version", _wrap(orig, make_arch),
        "validate_args() queries the CUDA arch when TP > 1 or CP > 1, then asserts "
        "CUDA_DEVICE_MAX_CONNECTIONS=1: on CPU reports arch 0 and sets that variable if unset"))

    # 8. _warmup_jit_function draws torch.rand(..., device="cuda") with TP-dependent shapes; on CPU
    #    that consumes the CPU generator, so TP sizes would build different weights.
    _, orig = _target("megatron.training.initialize", "_warmup_jit_function")

    def make_warmup(original):
        def _warmup_jit_function(*args, **kwargs):
            if not _no_cuda():
                return original(*args, **kwargs)
            with torch.random.fork_rng(devices=[]):
                return original(*args, **kwargs)
        return _warmup_jit_function

    patches.append(TrainingPatch(
        "megatron.training.initialize", "_warmup_jit_function", _wrap(orig, make_warmup),
        "_warmup_jit_function() draws TP-dependent random tensors from the CPU generator on CPU: run "
        "under torch.random.fork_rng(devices=[]) so TP=1 and TP=2 build the same weights"))
    return patches


_APPLIED: List[Tuple[Any, str, Any]] = []


def apply_training_cpu_patches(patches: Optional[List[TrainingPatch]] = None) -> List[TrainingPatch]:
    """Apply the patches by ``setattr`` (idempotent), keeping the originals for
    :func:`undo_training_cpu_patches`. Temporary: the project's guarded patcher will take over."""
    if _APPLIED:
        return []
    patches = training_cpu_patches() if patches is None else patches
    for p in patches:
        module = importlib.import_module(p.module_name)
        _APPLIED.append((module, p.attribute_name, getattr(module, p.attribute_name)))
        setattr(module, p.attribute_name, p.replacement)
    return patches


def undo_training_cpu_patches() -> None:
    """Restore what :func:`apply_training_cpu_patches` replaced."""
    while _APPLIED:
        module, name, original = _APPLIED.pop()
        setattr(module, name, original)
