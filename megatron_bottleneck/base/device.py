"""Where a run executes: the one device decision every command and API makes (``--device``, ``train.device``).

:func:`resolve_device` is the rule, a pure function of what was asked and what the process sees;
:func:`choose_device` applies it to this process (``torch.cuda.is_available()``, ``torch.cuda.device_count()``,
torchrun's ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``). The rule, for a rank with local rank ``r`` of ``n`` on its
node, and ``G`` CUDA GPUs visible:

====================  ====================================  =======================================================
asked                 G > 0                                  G = 0
====================  ====================================  =======================================================
auto / None / ""      ``cuda:r``, NCCL, bf16                 CPU mode, gloo, fp32 (``cpu_allowed``; else an error:
                                                             a torchrun / Slurm job that forgot its GPUs)
``cpu``               CPU mode, gloo, fp32 (GPUs unused)     CPU mode, gloo, fp32
``cuda``              ``cuda:r``, NCCL, bf16                 error
``cuda:N``            ``cuda:N`` (one rank per node), NCCL   error
====================  ====================================  =======================================================

``r >= G`` (more ranks on a node than GPUs) and ``N >= G`` are errors; so is ``cuda:N`` with ``n > 1`` (ranks
cannot share one GPU under NCCL: ask ``cuda``, rank ``r`` on ``cuda:r``). Every error is one
:class:`~megatron_bottleneck.base.errors.DeviceError` line saying what to ask for instead. ``dtype`` is what
``auto`` precision means there: bfloat16 on a GPU, float32 on a CPU. CPU mode (Megatron-Core redirected to CPU,
:func:`megatron_bottleneck.enable_cpu_mode`) is entered for CPU runs only, and a GPU run never enters it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from .errors import DeviceError

__all__ = ["DeviceChoice", "resolve_device", "choose_device", "auto_dtype", "collective_device",
           "communicator_device"]


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``auto`` precision is on ``device``: bfloat16 on a CUDA GPU, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class DeviceChoice:
    """The decision for one rank (see the module docstring).

    device: where this rank's tensors live (``cuda:i`` or ``cpu``). cpu_mode: whether the process enters
    Megatron-Core's CPU mode (True exactly for CPU runs). backend: the ``torch.distributed`` backend, "nccl"
    on GPUs, "gloo" on CPUs. dtype: the dtype ``auto`` precision resolves to (:func:`auto_dtype`).
    """

    device: torch.device
    cpu_mode: bool
    backend: Literal["nccl", "gloo"]
    dtype: torch.dtype

    @classmethod
    def cpu(cls) -> "DeviceChoice":
        return cls(torch.device("cpu"), True, "gloo", torch.float32)

    @classmethod
    def cuda(cls, index: int) -> "DeviceChoice":
        dev = torch.device("cuda", index)
        return cls(dev, False, "nccl", auto_dtype(dev))


def _asked(option: str, requested: str) -> str:
    return f"{option} {requested}" if option.startswith("-") else f"{option}={requested}"


def _gpus(count: int) -> str:
    return f"{count} CUDA GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})" if count > 1 else \
        "1 CUDA GPU (cuda:0)"


def resolve_device(requested: Optional[str], *, cuda_available: bool, device_count: int, local_rank: int = 0,
                   local_world_size: int = 1, cpu_allowed: bool = True, option: str = "--device",
                   where: str = "this machine") -> DeviceChoice:
    """The device decision for a rank (the table in the module docstring); pure: no CUDA call, no environment.

    requested: "auto", None or "" (the same), "cpu", "cuda" or "cuda:N". cuda_available / device_count: what the
    process sees (GPUs are visible when both say so). local_rank / local_world_size: this rank's index among the
    ranks on its node, and their number. cpu_allowed: whether ``auto`` may fall back to CPU ranks without a GPU
    (False for a torchrun / Slurm job unless ``MB_CPU=1``). option / where: how the error lines name the setting
    (``--device``, ``train.device``) and the place (``this machine``, ``this torchrun / Slurm job``).
    Raises :class:`DeviceError` (one line) for a device that does not exist here or a malformed request.
    """
    text = (requested or "auto").strip()
    count = int(device_count) if cuda_available else 0
    if text == "cpu":
        return DeviceChoice.cpu()
    if text == "auto":
        if count == 0:
            if cpu_allowed:
                return DeviceChoice.cpu()
            raise DeviceError(f"no CUDA GPU is visible to {where}: request GPUs (sbatch --gpus-per-node=N, torchrun "
                              f"on a GPU node), or set MB_CPU=1 (or {_asked(option, 'cpu')}) to run CPU ranks with "
                              "gloo on purpose")
        index = None
    elif text == "cuda":
        index = None
    elif text.startswith("cuda:") and text[5:].isdigit():
        index = int(text[5:])
    else:
        raise DeviceError(f"{_asked(option, repr(requested))}: use auto, cpu, cuda or cuda:N")
    if count == 0:
        raise DeviceError(f"{_asked(option, text)} but {where} sees no CUDA GPU: run where a GPU is visible "
                          f"(check CUDA_VISIBLE_DEVICES, nvidia-smi), or use {_asked(option, 'cpu')}")
    if index is not None:
        if index >= count:
            raise DeviceError(f"{_asked(option, text)} but {where} sees {_gpus(count)}: use {_asked(option, 'cuda')} "
                              f"or an index below {count}")
        if local_world_size > 1:
            raise DeviceError(f"{_asked(option, text)} names one GPU for {local_world_size} ranks on this node: use "
                              f"{_asked(option, 'cuda')} (rank r on cuda:r)")
        return DeviceChoice.cuda(index)
    if local_rank >= count or local_world_size > count:
        raise DeviceError(f"{local_world_size} ranks on this node but {where} sees {_gpus(count)}: run at most "
                          f"{count} rank{'s' if count != 1 else ''} per node (one per GPU), or use "
                          f"{_asked(option, 'cpu')}")
    return DeviceChoice.cuda(local_rank)


def choose_device(requested: Optional[str] = None, *, local_rank: Optional[int] = None,
                  local_world_size: Optional[int] = None, cpu_allowed: bool = True, option: str = "--device",
                  where: str = "this machine") -> DeviceChoice:
    """:func:`resolve_device` for this process: GPUs as ``torch.cuda`` sees them (not queried when ``cpu`` is
    asked), local rank and node size from torchrun's ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` unless given
    (0 and 1 outside torchrun). Inside CPU mode no GPU is visible (CPU mode hides them)."""
    if (requested or "").strip() == "cpu":
        available, count = False, 0
    else:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return resolve_device(requested, cuda_available=available, device_count=count, local_rank=local_rank,
                          local_world_size=local_world_size, cpu_allowed=cpu_allowed, option=option, where=where)


def collective_device(backend: str, tensor_device: torch.device, *, cuda_available: bool,
                      current_device: int = 0) -> torch.device:
    """Where a tensor on ``tensor_device`` must be for a collective of a group with ``backend``; pure (no CUDA
    call). NCCL reduces CUDA tensors only: a CPU tensor (e.g. built under ``use_cpu_initialization``) goes to
    ``cuda:current_device``. gloo, and a group with a backend per device type (``"cpu:gloo,cuda:nccl"``), take
    it where it is. NCCL without a visible GPU is one :class:`DeviceError` line."""
    tensor_device = torch.device(tensor_device)
    if backend != "nccl" or tensor_device.type == "cuda":
        return tensor_device
    if not cuda_available:
        raise DeviceError("the process group's backend is NCCL but this process sees no CUDA GPU: start the ranks "
                          "on GPUs, or on CPU ranks with gloo (--device cpu)")
    return torch.device("cuda", current_device)


def communicator_device(group, tensor_device: torch.device) -> torch.device:
    """:func:`collective_device` for ``group`` (None: the default group) in this process: its backend as
    ``torch.distributed`` reports it, GPUs as ``torch.cuda`` sees them."""
    backend = str(dist.get_backend(group))
    available = backend == "nccl" and torch.cuda.is_available()
    return collective_device(backend, tensor_device, cuda_available=available,
                             current_device=torch.cuda.current_device() if available else 0)
