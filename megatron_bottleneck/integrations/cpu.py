"""CPU mode for Megatron-Core: real tensor/pipeline parallelism on CPU processes with gloo.

Megatron-Core assumes CUDA in a handful of places. :func:`enable_cpu_mode` redirects exactly those, in
this process, so that parallel state, tensor-parallel layers, the RNG tracker, Megatron DDP, the
distributed optimizer and the pipeline schedules run on CPU:

==============================================  ==============================================
Megatron-Core calls                              redirected to
==============================================  ==============================================
``torch.cuda.is_available()``                     ``False``, ``0``: a CPU rank sees no GPU, even
``torch.cuda.device_count()``                     on a GPU machine (auto precision is fp32)
``torch.cuda.current_device()``                   ``"cpu"`` (used as an allocation device)
``torch.cuda.synchronize()``                      no-op
``torch.cuda.current_stream()`` (0.19 DDP)        a stream object whose methods are no-ops
CUDA RNG state (tracker ``add``/``fork``)         a private CPU ``torch.Generator`` ("shadow")
``device="cuda"`` / ``Tensor.cuda()``             CPU, through a ``TorchFunctionMode``
batched pipeline p2p (``batch_p2p_comm``)        Megatron's unbatched p2p (gloo can swap the
                                                  two directions' messages on a 2-stage ring)
optimizer gradient clipping (asserts CUDA)       the same scaling on CPU tensors
``Tensor.type()`` (DistributedOptimizer accepts   ``'torch.cuda.FloatTensor'`` etc. for CPU tensors
only CUDA parameter types)                        (only the no-argument form; casts are untouched)
==============================================  ==============================================

Every patch is *guarded*: before anything changes, each target is looked up, and a missing one raises
:class:`~megatron_bottleneck.base.errors.CpuModeError` naming it and the installed megatron-core version
(a release that renames a symbol fails here, not far away). The originals are kept;
:func:`disable_cpu_mode` puts them back and leaves the ``TorchFunctionMode``; :func:`cpu_mode` is the
context-manager form. What was patched is logged once (logger ``megatron_bottleneck``) and listed by
:func:`cpu_mode_patches`. Extra patch sets (e.g. for Megatron-LM's ``megatron/training``) register with
:func:`register_patch_set` and are applied when their package imports.

Nothing changes until :func:`enable_cpu_mode` is called. It is for CPU runs only (the device decision,
:func:`megatron_bottleneck.base.device.resolve_device`, says when: ``--device cpu``, or no GPU visible); a GPU
run never calls it, and a CPU run on a GPU machine leaves the GPUs unused. The
shadow generator keeps the tracker's bookkeeping exact without touching torch's CPU RNG, so dropout inside
tensor-parallel regions draws from the ordinary CPU generator (identical across TP ranks). For debugging
and CI, not for speed.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.pipeline_parallel import p2p_communication
from torch.overrides import TorchFunctionMode

from ..base.errors import CpuModeError
from ..models.llama import SequenceParallelNorm
from .bridge import prepare_bridge_import
from .bridge_cpu import bridge_patches
from .megatron_training_cpu import training_patches
from .patching import Patch

__all__ = ["enable_cpu_mode", "disable_cpu_mode", "cpu_mode", "is_cpu_mode", "cpu_mode_patches", "Patch", "CpuMode",
           "register_patch_set"]

log = logging.getLogger("megatron_bottleneck")


class _NullStream:
    """Stands in for a CUDA stream: every method is a no-op."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` and ``Tensor.cuda()`` to CPU; reports CUDA type names for ``Tensor.type()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # DistributedOptimizer accepts only 'torch.cuda.*Tensor' parameters
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------- replacements
_SHADOW = torch.Generator(device="cpu")  # the CUDA RNG state Megatron's tracker saves and restores
_STREAM = _NullStream()


def _get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return _SHADOW.get_state()


def _set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    _SHADOW.set_state(new_state)


def _manual_seed(seed: int) -> None:
    _SHADOW.manual_seed(int(seed))


def _unbatched_p2p_ops(**kwargs):
    """``batch_p2p_comm`` over gloo: on a two-stage ring (prev == next peer) gloo pairs the two
    directions' messages by posting order and can swap them; Megatron's unbatched path keeps the
    directions on separate groups. Same signature, list of requests as the batched path returns."""
    return list(p2p_communication._p2p_ops(**kwargs).values())


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 asserts CUDA float tensors; same scaling on CPU."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for p in parameters:
        g = getattr(p, attr, None)
        if g is not None:
            g.detach().mul_(coeff)


def _sequence_parallel_norm(original):
    """Megatron's local-spec norm (``WrappedTorchNorm``: torch's LayerNorm / RMSNorm) asserts that sequence
    parallelism is off, and its SP-capable norms need apex or Transformer Engine. Under SP, build
    :class:`~megatron_bottleneck.models.llama.SequenceParallelNorm` instead: the same math and state-dict keys,
    its parameters marked ``sequence_parallel`` so Megatron all-reduces their gradients over TP."""

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if getattr(config, "sequence_parallel", False) and getattr(config, "normalization", "LayerNorm") in (
                "LayerNorm", "RMSNorm") and not getattr(config, "persist_layer_norm", False) and not getattr(
                config, "memory_efficient_layer_norm", False):
            return SequenceParallelNorm(config, hidden_size, eps=eps)
        return original(cls, config, hidden_size, eps, *args, **kwargs)

    return __new__


def _const(value):
    return lambda _original: value


CORE_PATCHES: Tuple[Patch, ...] = (
    Patch("torch.cuda", "is_available", _const(lambda: False), "a CPU rank sees no GPU (even on a GPU machine)"),
    Patch("torch.cuda", "device_count", _const(lambda: 0), "a CPU rank sees no GPU (even on a GPU machine)"),
    Patch("torch.cuda", "current_device", _const(lambda: "cpu"), "allocation device of TP layers and buffers"),
    Patch("torch.cuda", "synchronize", _const(lambda device=None: None), "pipeline p2p synchronises"),
    Patch("torch.cuda", "current_stream", _const(lambda device=None: _STREAM), "DDP grad sync streams (0.19)"),
    Patch("torch.cuda", "default_stream", _const(lambda device=None: _STREAM), "DDP grad sync streams (0.19)"),
    Patch("torch.cuda", "get_rng_state", _const(_get_state), "the TP RNG tracker saves CUDA RNG state"),
    Patch("torch.cuda", "set_rng_state", _const(_set_state), "the TP RNG tracker restores CUDA RNG state"),
    Patch("torch.cuda", "manual_seed", _const(_manual_seed), "the TP RNG tracker seeds CUDA RNG"),
    Patch("torch.cuda", "manual_seed_all", _const(_manual_seed), "the TP RNG tracker seeds CUDA RNG"),
    Patch("torch.cuda.random", "get_rng_state", _const(_get_state), "the TP RNG tracker saves CUDA RNG state"),
    Patch("torch.cuda.random", "set_rng_state", _const(_set_state), "the TP RNG tracker restores CUDA RNG state"),
    Patch("torch.cuda.random", "manual_seed", _const(_manual_seed), "the TP RNG tracker seeds CUDA RNG"),
    Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _const(_get_state),
          "the tracker's fork() reads CUDA RNG state"),
    Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _const(_set_state),
          "the tracker's fork() writes CUDA RNG state"),
    Patch("megatron.core.pipeline_parallel.p2p_communication", "_batched_p2p_ops", _const(_unbatched_p2p_ops),
          "gloo can swap a two-stage ring's batched messages"),
    Patch("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", _const(_clip_grad_by_total_norm_cpu),
          "Megatron's clipping asserts CUDA tensors"),
    Patch("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__", _sequence_parallel_norm,
          "the local spec's torch norm refuses sequence parallelism (its SP norms need apex / TE)"),
)

# name -> (package that must be findable for the set to apply, () -> patches, () -> None run before importing it)
DEFAULT_PATCH_SETS: Dict[str, Tuple[str, Callable[[], List[Patch]], Optional[Callable[[], None]]]] = {
    "megatron-lm": ("megatron.training", training_patches, None),
    "megatron-bridge": ("megatron.bridge", bridge_patches, prepare_bridge_import),
}


def _megatron_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a source checkout
        return "unknown"


def _resolve(patch: Patch) -> Tuple[Any, str, Any]:
    """(owner object, attribute name, original) of a patch target; CpuModeError if it is missing."""
    try:
        owner = importlib.import_module(patch.module)
    except ImportError as exc:
        raise CpuModeError(f"CPU mode cannot patch {patch.target}: module {patch.module} does not import ({exc}); "
                           f"megatron-core {_megatron_version()} is not supported by CPU mode "
                           "(tested: 0.16.1 and 0.19.2).") from None
    *path, name = patch.attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
    if owner is None or not hasattr(owner, name):
        raise CpuModeError(f"CPU mode cannot patch {patch.target}: it does not exist in megatron-core "
                           f"{_megatron_version()} (tested: 0.16.1 and 0.19.2). Use a tested megatron-core "
                           "version, or report this with the version.")
    return owner, name, getattr(owner, name)


class CpuMode:
    """CPU mode of one process: its patch sets, the originals it replaced and its device redirection.

    What it patches (torch.cuda, megatron-core's modules) belongs to the whole process, so a process has one,
    :data:`CPU_MODE`, which :func:`enable_cpu_mode`, :func:`disable_cpu_mode`, :func:`cpu_mode`,
    :func:`is_cpu_mode`, :func:`cpu_mode_patches` and :func:`register_patch_set` act on.

    Fields: ``patch_sets`` (name -> (package, () -> patches, prepare or None): applied when the package is
    installed), ``applied`` ((patch, owner, original) in the order applied), ``mode`` (the device redirection while
    on, else None)."""

    def __init__(self, patch_sets: Optional[Dict] = None):
        self.patch_sets: Dict = dict(DEFAULT_PATCH_SETS if patch_sets is None else patch_sets)
        self.applied: List[Tuple[Patch, Any, Any]] = []
        self.mode: Optional[TorchFunctionMode] = None

    @property
    def on(self) -> bool:
        return self.mode is not None

    def register_patch_set(self, name: str, package: str, patches: Callable[[], List[Patch]],
                           prepare: Optional[Callable[[], None]] = None) -> None:
        """See :func:`register_patch_set`."""
        self.patch_sets[name] = (package, patches, prepare)

    def active_patches(self) -> List[Patch]:
        """The core patches, then each patch set whose package is installed (importing it, after its prepare)."""
        patches = list(CORE_PATCHES)
        for package, make, prepare in self.patch_sets.values():
            try:
                if importlib.util.find_spec(package) is None:
                    continue
            except (ImportError, ValueError):  # its parent package is absent (or a module without a spec)
                continue
            if prepare is not None:
                prepare()
            importlib.import_module(package)
            patches.extend(make())
        return patches

    def enable(self) -> None:
        """See :func:`enable_cpu_mode`."""
        if self.mode is not None:
            return
        patches = self.active_patches()
        resolved = [(p, *_resolve(p)) for p in patches]  # all checked before anything changes
        for patch, owner, name, original in resolved:
            setattr(owner, name, patch.make(original))
            self.applied.append((patch, owner, original))
        _SHADOW.manual_seed(0)
        self.mode = _CudaToCpu()
        self.mode.__enter__()
        log.info("CPU mode on: %d redirections (%s) and device='cuda' -> CPU", len(self.applied),
                 ", ".join(p.target for p in patches))

    def disable(self) -> None:
        """See :func:`disable_cpu_mode`."""
        if self.mode is None:
            return
        while self.applied:
            patch, owner, original = self.applied.pop()
            setattr(owner, patch.attr.rsplit(".", 1)[-1], original)
        self.mode.__exit__(None, None, None)
        self.mode = None
        log.info("CPU mode off: originals restored")


CPU_MODE = CpuMode()
"""This process's CPU mode (the module functions below act on it)."""


def register_patch_set(name: str, package: str, patches: Callable[[], List[Patch]],
                       prepare: Optional[Callable[[], None]] = None) -> None:
    """Add patches applied by :func:`enable_cpu_mode` whenever ``package`` is installed (Megatron-LM's
    ``megatron.training`` and Megatron-Bridge's ``megatron.bridge`` use this); ``prepare()``, if given, runs
    before the package is imported. A set registered while CPU mode is on applies at the next enable."""
    CPU_MODE.register_patch_set(name, package, patches, prepare)


def is_cpu_mode() -> bool:
    """True while CPU mode is on in this process."""
    return CPU_MODE.on


def cpu_mode_patches() -> List[str]:
    """The targets patched now, as ``module.attribute`` strings (empty when CPU mode is off)."""
    return [patch.target for patch, _owner, _orig in CPU_MODE.applied]


def enable_cpu_mode() -> None:
    """Make Megatron-Core (and Megatron-LM's training package and Megatron-Bridge, when installed) run on CPU in
    this process.

    Idempotent. Call before building models; combine with ``torch.distributed.init_process_group("gloo")``
    and Megatron configs with ``use_cpu_initialization=True`` (so every TP size draws the same weights).
    Raises :class:`CpuModeError`, changing nothing, when a target is missing in the installed version.
    """
    CPU_MODE.enable()


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode`: put every original back and leave the device redirection."""
    CPU_MODE.disable()


@contextlib.contextmanager
def cpu_mode() -> Iterator[None]:
    """``with cpu_mode(): ...`` runs the block in CPU mode (left as it was found afterwards)."""
    was_on = is_cpu_mode()
    enable_cpu_mode()
    try:
        yield
    finally:
        if not was_on:
            disable_cpu_mode()
