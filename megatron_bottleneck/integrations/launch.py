"""Run a function on N local ranks: CPU ranks (gloo on 127.0.0.1, CPU mode) or one rank per GPU (NCCL), meeting
in a file store.

The ranks are forked from a ``torch.multiprocessing`` fork server that has imported torch and Megatron-Core
once (:data:`PRELOAD`, :mod:`.fork_preload`): a rank starts in well under a second instead of re-importing them (about 10 s of CPU
per rank on 2 cores). Each rank gets the caller's environment, working directory, ``sys.path`` and
``__main__`` (as with ``spawn``: keep the ``if __name__ == "__main__":`` guard in scripts).

Where the ranks run is ``launch``'s ``device`` (default ``"cpu"``), decided for each rank by
:func:`~megatron_bottleneck.base.device.resolve_device` before any rank starts (a GPU that is not there is one
:class:`~megatron_bottleneck.base.errors.DeviceError` line): a CPU rank joins a gloo group and enters CPU mode
(:func:`~megatron_bottleneck.integrations.cpu.enable_cpu_mode`); a GPU rank ``r`` sets ``cuda:r`` as its device
and joins an NCCL group, without CPU mode. Each rank has ``torch.distributed`` initialised; Megatron's parallel
state is up to the function (:func:`megatron_bottleneck.initialize_parallel`). Failures come back to the caller
as one exception:

* a rank raised one of our errors (:class:`~megatron_bottleneck.base.errors.BottleneckError`): that error
  is raised again in the parent, same type and message (other ranks' failures, typically a collective
  broken by the failed rank's exit, are consequences: their tracebacks are kept, their messages dropped);
* otherwise :class:`~megatron_bottleneck.base.errors.RankFailure` (a ``RuntimeError``) with a one-line
  message per distinct failure.

Either way the exception carries ``messages`` (the distinct messages, in rank order) and ``tracebacks``
(each failing rank's traceback), so a command line can print one line per message and the traceback
only when asked.
"""
from __future__ import annotations

import importlib
import os
import pickle
import queue as queue_mod
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.multiprocessing as mp

from ..base.device import DeviceChoice, choose_device
from ..base.errors import BottleneckError, RankFailure
from ..base.quiet import quiet_megatron_warnings
from .cpu import enable_cpu_mode

__all__ = ["launch", "free_port", "init_process"]

FAILURE_GRACE_S = 30.0
"""Seconds the other ranks get to report their own failure after one rank failed."""

PRELOAD = ("megatron_bottleneck.integrations.fork_preload",)
"""What the fork server imports before forking ranks (:mod:`.fork_preload`: torch and Megatron-Core, each import
guarded, after this package's import-time guards)."""


def _context():
    """The fork-server context, its preload list set before the server starts (on the first launch)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(exc: BaseException) -> Dict[str, Any]:
    cls = type(exc)
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "message": str(exc),
            "ours": isinstance(exc, BottleneckError), "traceback": traceback.format_exc()}


def init_process(choice: DeviceChoice, **init_kwargs: Any) -> None:
    """Put this process on ``choice`` (:class:`~megatron_bottleneck.base.device.DeviceChoice`) and join the
    process group: a GPU rank sets its CUDA device, then ``init_process_group("nccl", **init_kwargs)``; a CPU rank
    ``init_process_group("gloo", ...)``, then CPU mode. ``init_kwargs``: rendezvous (none under torchrun)."""
    if not choice.cpu_mode:
        torch.cuda.set_device(choice.device)
    torch.distributed.init_process_group(choice.backend, **init_kwargs)
    if choice.cpu_mode:
        enable_cpu_mode()


def rank_threads(world_size: int, env: Optional[Dict[str, str]] = None) -> int:
    """Intra-op threads of one CPU rank: ``OMP_NUM_THREADS`` from ``env`` (the caller's environment) when it is a
    positive integer (as torchrun's ranks take it: a machine shared with other jobs, e.g. CI's two lanes side by
    side, where OpenMP threads beyond the free cores spin and slow every process), else the machine's cores
    split over the ``world_size`` ranks."""
    env = os.environ if env is None else env
    value = str(env.get("OMP_NUM_THREADS", "")).strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, (os.cpu_count() or 1) // world_size)


def _worker(rank: int, world_size: int, store_file: str, env: Dict[str, str], choice: DeviceChoice, fn: Callable,
            args: Sequence, queue) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's from its start
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(rank_threads(world_size, env))
    quiet_megatron_warnings()
    try:
        # The ranks meet in a file store, not on a TCP port: a port picked by free_port() can be taken by
        # another process before rank 0 binds it (EADDRINUSE when several launches run side by side).
        init_process(choice, init_method=f"file://{store_file}", rank=rank, world_size=world_size)
        # Plain pickle: torch's queue reducers share tensors through file descriptors, which die
        # with this process.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException as exc:  # report every failure to the parent
        queue.put((rank, False, _describe(exc)))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _rebuild(failures: Dict[int, Dict[str, Any]]) -> BaseException:
    """The exception the parent raises for the ranks' failures (see the module docstring)."""
    tracebacks = {r: f["traceback"] for r, f in failures.items()}
    ours = {r: f for r, f in failures.items() if f["ours"]}
    shown = ours or failures
    messages: List[str] = []
    for rank in sorted(shown):
        f = shown[rank]
        line = f["message"] if f["ours"] else f"rank {rank}: {f['type'].split(':')[-1]}: {f['message']}"
        if line not in messages:
            messages.append(line)
    first = shown[min(shown)]
    if ours:
        module, _, name = first["type"].partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
            exc = cls(first["message"])
        except Exception:  # not re-creatable with one message: fall through to RankFailure
            exc = None
        if isinstance(exc, BottleneckError):
            exc.messages, exc.tracebacks = messages, tracebacks
            return exc
    return RankFailure(messages, tracebacks)


def launch(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0, device: Optional[str] = "cpu",
           option: str = "--device") -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks and return their results in rank order.

    ``device``: ``"cpu"`` (the default: CPU ranks, gloo, CPU mode), ``"auto"`` / None (one GPU per rank when GPUs
    are visible, else CPU ranks), ``"cuda"`` (rank ``r`` on ``cuda:r``) or ``"cuda:N"`` (one rank): the rule of
    :func:`~megatron_bottleneck.base.device.resolve_device`, applied to every rank before any starts, so a GPU
    that is not there (or fewer GPUs than ranks) is one :class:`DeviceError` naming ``option``.
    ``fn`` must be importable (a module-level function) and its result picklable. Raises the ranks'
    error as described in the module docstring; a rank that dies without a result (or a run past
    ``timeout`` seconds) raises :class:`RankFailure`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    choices = [choose_device(device, local_rank=r, local_world_size=world_size, option=option)
               for r in range(world_size)]
    ctx = _context()
    queue = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="mb-launch-")
    store_file = os.path.join(store_dir, "store")
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_file, env, choices[r], fn, args, queue))
             for r in range(world_size)]
    # The fork server (started by the first launch) inherits these: a warning text shows once (it imports
    # Megatron-Core, which repeats its missing-Apex/TE warnings), and torch.cuda.is_available() there (Megatron-Core
    # calls it on import) asks NVML instead of initialising CUDA, which would leave the forked GPU ranks unable
    # to use CUDA. The ranks run with the caller's own environment.
    server_env = {"PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "once::UserWarning"])),
                  "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    previous = {k: os.environ.get(k) for k in server_env}
    os.environ.update(server_env)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in previous.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    results: Dict[int, Any] = {}
    failures: Dict[int, Dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    grace = None  # after the first failure: how long the other ranks get to report theirs
    try:
        while len(results) + len(failures) < world_size:
            try:
                rank, ok, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                if failures:
                    # The others either fail too (the same input error, or a collective broken by the failed
                    # rank) or wait forever on a collective with it: wait for those still running, up to
                    # FAILURE_GRACE_S, so the report does not depend on which rank failed first.
                    running = [r for r, p in enumerate(procs)
                               if r not in results and r not in failures and p.exitcode is None]
                    if not running or time.monotonic() > grace:
                        break
                    continue
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and queue.empty():
                    return_codes = [procs[i].exitcode for i in dead]
                    raise RankFailure([f"ranks {dead} died without a result (exit codes {return_codes})"], {})
                if time.monotonic() > deadline:
                    raise RankFailure([f"no result after {timeout:.0f} s"], {})
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                grace = grace or time.monotonic() + FAILURE_GRACE_S
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.terminate()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if failures:
        raise _rebuild(failures)
    return [results[r] for r in range(world_size)]
