"""Atomic, resumable checkpoints: Megatron distributed checkpointing for the model and the optimizer
(its sharded state), per-rank files for scheduler, RNG and data position.

Layout under ``dir``::

    iter_0000100/          model (dist_checkpointing, re-shardable across TP/PP) + rank_<r>.pt + config.yaml
    iter_0000200.tmp/      a save in progress (or killed mid-way): ignored by resume, removed by the next save
    latest                 "iter_0000200", replaced atomically (write-temp-then-os.replace) after the rename

A save writes into ``iter_N.tmp``, all ranks meet at a barrier, rank 0 renames it to ``iter_N`` and then
points ``latest`` at it, so a crash at any moment leaves the previous checkpoint intact. An asynchronous save
(:class:`CheckpointWriter` with ``async_save``) does the same, the rename and ``latest`` in its finalisation,
once every rank's background write has finished.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import signal
import threading
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, TemporalAsyncCaller

from ..base.errors import CheckpointError

LATEST = "latest"
LAYOUT = "layout.json"


def _name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(directory: Optional[str]) -> Optional[str]:
    """Path of the newest complete checkpoint under ``directory`` (None if there is none)."""
    if not directory:
        return None
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    full = os.path.join(directory, name)
    return full if os.path.isdir(full) else None


def _model_state(chunks) -> Dict:
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# Megatron's DistributedOptimizer saves its Adam state as each data-parallel rank's buffer shard
# (Megatron-LM's default "dp_reshardable": parallel save and load, no gather). On megatron-core 0.16 the
# other formats fail on the torch-Adam path: "fully_sharded_model_space" (flattened_range unsupported),
# "fully_reshardable" (KeyError 'step').
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sub_optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _ensure_optimizer_state(optimizer) -> None:
    """Give every parameter Adam state (zeros, step 1) before a load, so the sharded state dict has the
    shapes the checkpoint fills in. Megatron does this with a dummy step for some formats only. The
    step uses zero gradients and lr 0, so AdamW leaves the weights exactly as they are."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None or all(len(inner.state[p]) for g in inner.param_groups for p in g["params"]):
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)  # a load precedes training: no gradients to keep
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr


def _restore_adam_steps(optimizer) -> None:
    """Megatron's DistributedOptimizer on the torch-Adam path (no Apex/TE) keeps the step count in its
    param groups; at load it writes one shared ``step`` tensor into every parameter's state, and the
    dp_reshardable per-parameter copy comes back with the pre-load value. torch Adam increments each
    parameter's step in place, so a shared tensor would also advance once per parameter per step. Give
    each parameter its own step, equal to its group's saved count (Adam's bias correction depends on it)."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for group in (inner.param_groups if inner is not None else ()):
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                old = st.get("step") if st else None
                if torch.is_tensor(old):
                    st["step"] = torch.tensor(float(group["step"]), dtype=old.dtype, device=old.device)


def _full_state(chunks, optimizer, is_loading: bool) -> Dict:
    model = _model_state(chunks)
    state = {"model": model}
    if optimizer is not None:
        if is_loading:
            _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
    return state


def start_writer_helpers() -> None:
    """Start the helper process megatron-core's checkpoint writer uses (a multiprocessing manager, made at the
    first save) now, with SIGUSR1 and SIGTERM ignored so that it inherits that: a preemption signal sent to
    every process of the job (Slurm, or torchrun forwarding it) would otherwise kill it in the middle of the
    very save the signal asked for (EOFError). Call it before training, from the main thread."""
    make = getattr(filesystem_async, "get_write_results_queue", None) or getattr(  # 0.19 / 0.16
        filesystem_async, "_get_write_results_queue", None)
    if make is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        make()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _async_save_api():
    """(extra ``dist_checkpointing.save`` arguments, ``AsyncCallsQueue`` class) of megatron-core's own async
    save: 0.16 has one implementation; 0.19 has ``async_strategy`` "mcore" (used here, the one tested) and
    "nvrx" (nvidia-resiliency-ext, taken only where "mcore" is gone)."""
    get_async_strategy = getattr(torch_strategy, "get_async_strategy", None)
    if "async_strategy" not in inspect.signature(dist_checkpointing.save).parameters or get_async_strategy is None:
        return {}, AsyncCallsQueue  # 0.16
    try:
        name, modules = get_async_strategy("mcore")
    except (TypeError, ImportError):
        name, modules = get_async_strategy("nvrx")
    return {"async_strategy": name}, modules["AsyncCallsQueue"]


class CheckpointWriter:
    """Writes checkpoints synchronously or, with ``async_save``, in the background (Megatron's async distributed
    checkpoint save: a writer process per rank and an ``AsyncCallsQueue``).

    Atomic either way: shards go to ``iter_N.tmp``; only when every rank's writer has finished (the queue agrees
    on it collectively) does rank 0 rename the folder, replace ``latest`` and prune, inside the request's
    finalisation. A crash before that leaves ``latest`` and the previous checkpoint as they were.

    Collective methods (``save``, ``finalize``, ``close``) are called by every rank at the same point. The writer
    process is forked on CPUs (its memory is a snapshot of the state at the save) and, on GPUs, Megatron's
    persistent worker receives tensors already copied to host memory."""

    def __init__(self, async_save: bool = False):
        self.async_save = bool(async_save)
        self._queue = None
        self._save_kwargs: Dict = {}
        if self.async_save:
            self._save_kwargs, queue_class = _async_save_api()
            # The persistent worker sets a CUDA device in a spawned process; without GPUs Megatron forks one
            # writer per save instead.
            self._queue = queue_class(persistent=torch.cuda.is_available())

    @property
    def pending(self) -> int:
        """Saves scheduled and not finalised yet (the same count on every rank)."""
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0

    def busy(self) -> Optional[bool]:
        """Whether this rank's writer is still writing the oldest pending save, read locally (no collective):
        True / False for a forked writer, None when it cannot be told without a collective (the persistent
        worker) or nothing is pending."""
        if not self.pending:
            return None
        caller = getattr(self._queue.async_calls[0], "async_caller", None)
        if not isinstance(caller, TemporalAsyncCaller):
            return None
        process = caller.process
        return process is not None and process.is_alive()

    def finalize(self, blocking: bool = False) -> None:
        """Finalise the saves whose writes are done on every rank (all pending ones with ``blocking``)."""
        if self.pending:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        """Finish every pending save (blocking) and stop the writer."""
        if self._queue is not None:
            self._queue.close()

    def save(self, directory: str, iteration: int, chunks: List, extra: Dict, config=None, keep_last: int = 2,
             optimizer=None, layout: Optional[Dict] = None) -> str:
        """Save (or, with ``async_save``, start saving) checkpoint ``iteration``; see :func:`save_checkpoint`.
        A previous save still pending is finished first."""
        self.finalize(blocking=True)  # its .tmp folder must not be taken for a stale one
        rank = dist.get_rank() if dist.is_initialized() else 0
        final = os.path.join(directory, _name(iteration))
        tmp = final + ".tmp"
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            for stale in os.listdir(directory):
                if stale.endswith(".tmp"):
                    shutil.rmtree(os.path.join(directory, stale), ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        state = _full_state(chunks, optimizer, is_loading=False)
        request = None
        if self.async_save:
            request = dist_checkpointing.save(state, tmp, async_sharded_save=True, **self._save_kwargs)
        else:
            dist_checkpointing.save(state, tmp)
        torch.save(extra, os.path.join(tmp, f"rank_{rank}.pt"))
        if rank == 0 and config is not None:
            config.save(os.path.join(tmp, "config.yaml"))
        if rank == 0 and layout is not None:
            with open(os.path.join(tmp, LAYOUT), "w", encoding="utf-8") as f:
                json.dump(layout, f)
        if request is None:
            _barrier()
            _publish(directory, iteration, keep_last)
            _barrier()
        else:
            # Runs after Megatron's own finalisation (the shards' metadata, then a barrier), on every rank.
            request.add_finalize_fn(functools.partial(_publish, directory, iteration, keep_last))
            self._queue.schedule_async_request(request)
        return final


def _publish(directory: str, iteration: int, keep_last: int) -> None:
    """Rank 0: rename ``iter_N.tmp`` to ``iter_N``, point ``latest`` at it (write-temp-then-replace), prune."""
    if (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return
    final = os.path.join(directory, _name(iteration))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    pointer = os.path.join(directory, LATEST + ".tmp")
    with open(pointer, "w", encoding="utf-8") as f:
        f.write(_name(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(directory, LATEST))
    _prune(directory, keep_last)


def save_checkpoint(directory: str, iteration: int, chunks: List, extra: Dict, config=None,
                    keep_last: int = 2, optimizer=None, layout: Optional[Dict] = None,
                    writer: Optional[CheckpointWriter] = None) -> str:
    """Save atomically; ``extra`` is this rank's picklable state (scheduler, RNG, data position);
    ``layout`` (e.g. world size and TP/PP/DP sizes) is recorded and checked by :func:`load_checkpoint`.
    With an async ``writer`` (:class:`CheckpointWriter`) the shards are written in the background and the
    checkpoint appears under its final name when ``writer`` finalises it."""
    return (writer or CheckpointWriter()).save(directory, iteration, chunks, extra, config, keep_last,
                                               optimizer=optimizer, layout=layout)


def _prune(directory: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(d for d in os.listdir(directory) if d.startswith("iter_") and not d.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)


def check_layout(path: str, layout: Dict) -> None:
    """Raise a :class:`CheckpointError` before loading if ``path`` was saved with another parallel layout
    (the optimizer shards and the per-rank scheduler/RNG/data state only fit the layout they came from)."""
    file = os.path.join(path, LAYOUT)
    if not os.path.exists(file):
        return
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(
            f"cannot resume from {path}: it was saved with another parallel layout ({what}). Resume with the "
            "saved layout, or start a new run from its weights only (megatron_bottleneck.train.load_model_only "
            "loads the model at any TP/PP size), or set checkpoint.resume=false."
        )


def load_checkpoint(path: str, chunks: List, optimizer=None, layout: Optional[Dict] = None) -> Dict:
    """Load the model into ``chunks`` and the optimizer state, and return this rank's extra state."""
    if layout is not None:
        check_layout(path, layout)
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_ranks = len([f for f in os.listdir(path) if f.startswith("rank_") and f.endswith(".pt")])
    if saved_ranks != world:  # the same answer on every rank, so all ranks stop together
        raise CheckpointError(
            f"cannot resume from {path}: it holds the scheduler/RNG/data state of {saved_ranks} ranks and this "
            f"run has {world}. Resume with {saved_ranks} ranks, or load the weights alone with "
            "megatron_bottleneck.train.load_model_only (any TP/PP size)."
        )
    state = dist_checkpointing.load(_full_state(chunks, optimizer, is_loading=True), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(state["model"][f"chunk{i}"], strict=False)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of the (fp32) parameters
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return torch.load(os.path.join(path, f"rank_{rank}.pt"), weights_only=False)


def load_model_only(path: str, chunks: List) -> None:
    """Load just the model weights (any TP/PP layout)."""
    state = dist_checkpointing.load(_model_state(chunks), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=False)
