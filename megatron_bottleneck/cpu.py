"""CPU mode for Megatron-Core: real tensor/pipeline parallelism on CPU processes with gloo.

Megatron-Core assumes CUDA in a handful of places. :func:`enable_cpu_mode` redirects exactly those, in
this process, so that parallel state, tensor-parallel layers, the RNG tracker, Megatron DDP and the
pipeline schedules run on CPU:

==============================================  ==============================================
Megatron-Core calls                              redirected to
==============================================  ==============================================
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

Nothing changes until :func:`enable_cpu_mode` is called; on a CUDA machine, simply do not call it.
The shadow generator keeps the tracker's bookkeeping exact without touching torch's CPU RNG, so
dropout inside tensor-parallel regions draws from the ordinary CPU generator (identical across TP
ranks). For debugging and CI, not for speed.

:func:`launch` runs a function on N local ranks (``torch.multiprocessing``, gloo on 127.0.0.1) and
returns each rank's result; it is how the tests exercise real TP/PP.
"""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
import warnings
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_mode", "is_cpu_mode", "launch", "free_port"]

_ENABLED = False
_SHADOW: Optional[torch.Generator] = None
_MODE: Optional[TorchFunctionMode] = None


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
    """Rewrites ``device="cuda"`` and ``Tensor.cuda()`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # DistributedOptimizer accepts only 'torch.cuda.*Tensor' parameters
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _shadow_get_state(device: Any = "cuda") -> torch.Tensor:
    return _SHADOW.get_state()


def _shadow_set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    _SHADOW.set_state(new_state)


def _shadow_get_state_megatron(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return _SHADOW.get_state()


def _shadow_manual_seed(seed: int) -> None:
    _SHADOW.manual_seed(int(seed))


def _unbatched_p2p_ops(**kwargs):
    """``batch_p2p_comm`` over gloo: on a two-stage ring (prev == next peer) gloo pairs the two
    directions' messages by posting order and can swap them; Megatron's unbatched path keeps the
    directions on separate groups. Same signature, list of requests as the batched path returns."""
    from megatron.core.pipeline_parallel import p2p_communication

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


def is_cpu_mode() -> bool:
    """True once :func:`enable_cpu_mode` has run in this process."""
    return _ENABLED


def enable_cpu_mode() -> None:
    """Make Megatron-Core run on CPU in this process (idempotent). Call before building models.

    Combine with ``torch.distributed.init_process_group("gloo")`` and Megatron configs with
    ``use_cpu_initialization=True`` (so every TP size draws the same weights).
    """
    global _ENABLED, _SHADOW, _MODE
    if _ENABLED:
        return
    _SHADOW = torch.Generator(device="cpu")
    _SHADOW.manual_seed(0)
    stream = _NullStream()

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: stream
    cuda.default_stream = lambda device=None: stream
    cuda.get_rng_state = _shadow_get_state
    cuda.set_rng_state = _shadow_set_state
    cuda.manual_seed = _shadow_manual_seed
    cuda.manual_seed_all = _shadow_manual_seed
    cuda.random.get_rng_state = _shadow_get_state
    cuda.random.set_rng_state = _shadow_set_state
    cuda.random.manual_seed = _shadow_manual_seed

    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mrandom

    p2p_communication._batched_p2p_ops = _unbatched_p2p_ops

    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    mrandom._get_cuda_rng_state = _shadow_get_state_megatron
    mrandom._set_cuda_rng_state = _shadow_set_state

    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _ENABLED = True


def quiet_cpu_warnings() -> None:
    """Silence the warnings Megatron-Core prints on every CPU import and step (no Apex/TE, no
    CUDA_DEVICE_MAX_CONNECTIONS, torch deprecations inside Megatron); nothing else is filtered."""
    for pattern in (
        ".*(Apex|Transformer Engine) (is|are) not installed.*",
        ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(ShardedTensor|deprecated).*")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    quiet_cpu_warnings()
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        enable_cpu_mode()
        # Plain pickle: torch's queue reducers share tensors through file descriptors, which die
        # with this process.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` CPU ranks (gloo, 127.0.0.1) and return their results.

    ``fn`` must be importable (a module-level function) and its result picklable. Each rank has
    ``torch.distributed`` initialised and CPU mode enabled; Megatron's parallel state is up to ``fn``
    (see :func:`megatron_bottleneck.parallel.initialize_parallel`). Raises ``RuntimeError`` with the
    failing rank's traceback if any rank fails.
    """
    import queue as queue_mod

    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    errors: List[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and queue.empty():
                    errors.append(f"ranks {dead} died without a result (exit codes "
                                  f"{[procs[i].exitcode for i in dead]})")
                elif time.monotonic() > deadline:
                    errors.append(f"no result after {timeout:.0f}s")
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("launch: a rank failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
