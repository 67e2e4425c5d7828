"""Atomic, resumable checkpoints: Megatron distributed checkpointing for the model and the optimizer
(its sharded state), per-rank files for scheduler, RNG and data position.

Layout under ``dir``::

    iter_0000100/          model + optimizer (dist_checkpointing) + rank_<r>.pt + config.yaml + layout.json
    iter_0000200.tmp/      a save in progress (or killed mid-way): ignored by resume, removed by the next save
    latest                 "iter_0000200", replaced atomically (write-temp-then-os.replace) after the rename

A save writes into ``iter_N.tmp``, all ranks meet at a barrier, rank 0 renames it to ``iter_N`` and then
points ``latest`` at it, so a crash at any moment leaves the previous checkpoint intact. An asynchronous save
(:class:`CheckpointWriter` with ``async_save``) does the same, the rename and ``latest`` in its finalisation,
once every rank's background write has finished.

Resume (:func:`load_checkpoint`) first compares ``layout.json`` (parallel sizes, optimizer kind and format, the
model section and precision) with the run's: another model is one :class:`CheckpointError` line naming the
fields; a parallel layout Megatron can reshard to (see :func:`check_layout`) loads, one it cannot is one line
saying why. The model loads strictly. ``rank_<r>.pt`` holds the state that is the same on every rank
(iteration, sample count, scheduler) and, under ``PER_RANK``, this rank's own (RNG, the probe's accumulation),
restored only when the layout is unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import shutil
from importlib.metadata import version as installed_version
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
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


# Formats of Megatron's DistributedOptimizer state (``checkpoint.optimizer_format``):
#   "dp_reshardable" (the default, as Megatron-LM's): each DP rank writes its own buffer shard (parallel save, no
#       gather: bench/save_memory.py measures a third of the rank's shard beyond the model's save, nothing at load);
#       reshards over DP only (the buckets depend on TP/PP). A TP/PP change is refused in one line by
#       :func:`check_layout`, as Megatron-LM refuses it.
#   "fully_reshardable": model-space tensors (one per parameter); loads at any TP/PP/DP size. Saved with
#       megatron-core's memory-efficient variant (``distrib_optim_fully_reshardable_mem_efficient``): the shards
#       are gathered over gloo onto DP rank 0 only, the one rank that writes them (the plain variant all-gathers
#       the whole optimizer state onto every rank: bench/save_memory.py). A load still reads the whole state on
#       every rank. Two megatron-core defects on this path are worked around, for the versions in
#       ``FULLY_RESHARDABLE_SHIMMED``: its save misplaces the state of every parameter after a padded bucket
#       (:func:`_world_tensors_in_buffer_coordinates`), its load hits a KeyError 'step' on the torch-Adam path
#       (no Apex/TE) (:func:`_load_optimizer`).
# ("fully_sharded_model_space" asserts on the flattened ranges of the torch-Adam path: not offered.)
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")
DEFAULT_OPTIMIZER_FORMAT = "dp_reshardable"
OLD_OPTIMIZER_FORMAT = "dp_reshardable"  # what checkpoints without "optimizer_format" in layout.json hold
# megatron-core (major, minor) versions whose fully_reshardable code the shims were read against and are tested
# with (tests/distributed/test_optimizer_format.py: 0.16.1 in the Python 3.11 lane, 0.19.2 in the 3.12 lane).
FULLY_RESHARDABLE_SHIMMED = ((0, 16), (0, 19))


def check_optimizer_format(fmt: Optional[str], version: Optional[str] = None) -> None:
    """One :class:`CheckpointError` line when megatron-core ``version`` (default: the installed one) cannot save
    or load the distributed optimizer in ``fmt`` here: fully_reshardable outside ``FULLY_RESHARDABLE_SHIMMED``,
    the versions its two workarounds were verified with."""
    if fmt != "fully_reshardable":
        return
    if version is None:
        version = installed_version("megatron-core")
    low, high = FULLY_RESHARDABLE_SHIMMED
    if not low <= tuple(int(x) for x in re.findall(r"\d+", version)[:2]) <= high:
        raise CheckpointError(
            f"checkpoint.optimizer_format=fully_reshardable is verified here with megatron-core "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]} (its save and load need workarounds there) and this is "
            f"megatron-core {version}: use checkpoint.optimizer_format=dp_reshardable (TP/PP then stay as saved), "
            f"or install a verified megatron-core.")


def _optimizer_metadata(fmt: Optional[str], mem_efficient: bool = True) -> Dict:
    """``metadata`` of ``DistributedOptimizer.sharded_state_dict``; ``mem_efficient=False`` only for the
    comparison in bench/save_memory.py (megatron-core's all-gather onto every rank)."""
    fmt = fmt or DEFAULT_OPTIMIZER_FORMAT
    meta = {"distrib_optim_sharding_type": fmt}
    if fmt == "fully_reshardable":
        meta["distrib_optim_fully_reshardable_mem_efficient"] = mem_efficient
    return meta


def _sub_optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def ensure_optimizer_state(optimizer) -> None:
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


def adam_state(optimizer, model_param: torch.nn.Parameter):
    """``(main, state)`` of ``model_param`` in a Megatron-Core optimizer: the fp32 main parameter Adam updates
    (the model parameter itself for an fp32 model; for the distributed optimizer this rank's flat shard of it,
    the whole parameter at data-parallel size 1) and its Adam state (``exp_avg``, ``exp_avg_sq``, ``step``: what
    torch Adam holds, empty before the first step), found through Megatron-Core's own maps
    (``model_param_group_index_map`` of the distributed optimizer, ``float16_groups`` /
    ``fp32_from_float16_groups`` of the mixed-precision one). None when no sub-optimizer holds it (a parameter
    without gradient, or a shard on another data-parallel rank)."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        index = getattr(sub, "model_param_group_index_map", None)
        if index is not None:  # DistributedOptimizer
            if model_param not in index:
                continue
            group, order = index[model_param]
            main = inner.param_groups[group]["params"][order]
            return main, inner.state[main]
        for models, mains in zip(getattr(sub, "float16_groups", ()), getattr(sub, "fp32_from_float16_groups", ())):
            for p, main in zip(models, mains):
                if p is model_param:
                    return main, inner.state[main]
        for g in inner.param_groups:  # fp32 parameters: the model parameter is the main one
            if any(p is model_param for p in g["params"]):
                return model_param, inner.state[model_param]
    return None


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


def _full_state(chunks, optimizer, is_loading: bool, fmt: Optional[str] = None, mem_efficient: bool = True) -> Dict:
    model = _model_state(chunks)
    state = {"model": model}
    if optimizer is not None:
        fmt = fmt or DEFAULT_OPTIMIZER_FORMAT
        check_optimizer_format(fmt)
        if is_loading:
            ensure_optimizer_state(optimizer)
        fix = fmt == "fully_reshardable"
        with _world_tensors_in_buffer_coordinates(optimizer) if fix else contextlib.nullcontext():
            state["optimizer"] = optimizer.sharded_state_dict(
                model, is_loading=is_loading, metadata=_optimizer_metadata(fmt, mem_efficient))
        if fix and not is_loading:
            _drop_empty_param_state(state["optimizer"])
    return state


def _drop_empty_param_state(state: Dict) -> None:
    """The memory-efficient fully_reshardable save leaves ``param_state`` None on every DP rank but the first
    (which holds and writes the gathered state): dropped, so that it does not count as a differing common state
    (megatron-core warns at every save otherwise). Chained optimizers nest one state per sub-optimizer."""
    if "param_state" in state and state["param_state"] is None:
        del state["param_state"]
    for value in state.values():
        if isinstance(value, dict):
            _drop_empty_param_state(value)


def buffer_coordinates(buffer, world: torch.Tensor) -> torch.Tensor:
    """``world`` (the buffer's buckets concatenated without their padding, as megatron-core's
    ``get_parameter_state_dp_zero`` returns a state) laid out at the buffer's own offsets, zeros in each bucket's
    padding: bucket ``b`` (``numel_unpadded`` elements) goes to ``[b.offset, b.offset + b.numel_unpadded)`` of a
    tensor of the buffer's (padded) length, the coordinates of ``buffer.param_index_map``."""
    out = world.new_zeros(buffer.grad_data.numel())
    src = 0
    for bucket in buffer.buckets:
        n = bucket.numel_unpadded
        out[bucket.offset:bucket.offset + n] = world[src:src + n]
        src += n
    return out


@contextlib.contextmanager
def _world_tensors_in_buffer_coordinates(optimizer):
    """megatron-core's fully_reshardable optimizer state slices ``get_parameter_state_dp_zero``'s world tensors
    (every bucket's state concatenated without the bucket's padding) at ``param_index_map`` offsets, which count
    the padding: with more than one bucket per buffer (``ddp_bucket_size``, as communication overlap wants),
    every parameter after a padded bucket is saved with another parameter's Adam moments and main weights, and
    the last ones are padded with zeros (its warning "param range exceeds unpadded buffer"; measured: the
    resumed losses 5% off). The shim hands it the world tensors at the buffer's offsets
    (:func:`buffer_coordinates`), so each slice is its parameter's. Only for that format (``dp_zero`` reads the
    same method and scatters it back unpadded). Undone afterwards."""
    subs = [s for s in _sub_optimizers(optimizer) if hasattr(s, "get_parameter_state_dp_zero")]
    for sub in subs:
        original = sub.get_parameter_state_dp_zero

        def in_buffer_coordinates(*args, _sub=sub, _original=original, **kwargs):
            state = _original(*args, **kwargs)
            if state is None:
                return None
            for gbuf_idx, per_dtype in state.items():
                if not isinstance(gbuf_idx, int):
                    continue
                buffer = _sub.buffers[gbuf_idx]
                for world in per_dtype.values():
                    n = world["param"].numel() if "param" in world else buffer.numel_unpadded
                    if n != buffer.numel_unpadded:  # not the coalesced layout this shim was written for
                        raise CheckpointError(
                            f"megatron-core's fully_reshardable optimizer state has {n} elements per buffer, not "
                            f"the {buffer.numel_unpadded} of its buckets without padding that this version was "
                            "verified with: save with checkpoint.optimizer_format=dp_reshardable.")
                    for key in ("param", "exp_avg", "exp_avg_sq"):
                        if key in world:
                            world[key] = buffer_coordinates(buffer, world[key])
            return state

        sub.get_parameter_state_dp_zero = in_buffer_coordinates
    try:
        yield
    finally:
        for sub in subs:
            del sub.get_parameter_state_dp_zero  # the class's method again


def _load_optimizer(optimizer, state: Dict, fmt: Optional[str]) -> None:
    """``optimizer.load_state_dict``, with megatron-core's fully_reshardable 'step' bug worked around for that
    format: its ``_set_main_param_and_optimizer_states`` copies every key of a parameter's Adam state from the
    loaded tensors, which skip ``step`` (KeyError on the torch-Adam path, 0.16.1 and 0.19.2); the shim hands it
    the parameter's own step (a no-op copy). The dp_reshardable load passes ``step`` itself and needs no shim.
    :func:`_restore_adam_steps` then sets the saved count (both formats). Undone afterwards."""
    fix = fmt == "fully_reshardable"
    subs = [s for s in _sub_optimizers(optimizer) if fix and hasattr(s, "_set_main_param_and_optimizer_states")]
    for sub in subs:
        original = sub._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _sub=sub, _original=original):
            inner = _sub.optimizer
            if "step" not in tensors and inner is not None:
                group_index, group_order = _sub.model_param_group_index_map[model_param]
                st = inner.state.get(inner.param_groups[group_index]["params"][group_order], {})
                if torch.is_tensor(st.get("step")):
                    tensors = {**tensors, "step": st["step"]}
            return _original(model_param, tensors)

        sub._set_main_param_and_optimizer_states = set_states
    try:
        with torch.no_grad():  # the distributed optimizer copies into views of the (fp32) parameters
            optimizer.load_state_dict(state)
    finally:
        for sub in subs:
            del sub._set_main_param_and_optimizer_states  # the class's method again
    _restore_adam_steps(optimizer)


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
        state = _full_state(chunks, optimizer, is_loading=False, fmt=(layout or {}).get("optimizer_format"))
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
    ``layout`` (world size, TP/PP/DP sizes, optimizer kind and format, model section: ``Trainer.layout``)
    is recorded as layout.json and checked by :func:`load_checkpoint`.
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


PARALLEL_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "virtual_pipeline_model_parallel_size", "data_parallel_size")
PER_RANK = "rank"  # the key of the extra state that belongs to one rank of one layout (RNG, probe)
# layout.json key: False for a checkpoint written without optimizer state (``megatron-bottleneck convert-head`` of a
# checkpoint that held none); resuming it starts the optimizer afresh (Adam moments zero) and reads only the model,
# at any TP/PP
OPTIMIZER_SAVED = "optimizer_saved"
# layout.json key: the parameters (``chunk<i>.<name>``) whose optimizer state was written fresh (Adam moments zero)
# beside the kept state of every other one: the low-rank head's factors of a ``convert-head`` checkpoint
OPTIMIZER_RESET_PARAMS = "optimizer_reset_params"


def read_layout(path: str) -> Optional[Dict]:
    """The ``layout.json`` of the checkpoint at ``path`` (None for a checkpoint saved without one)."""
    file = os.path.join(path, LAYOUT)
    if not os.path.exists(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _changes(saved: Dict, now: Dict, keys, prefix: str = "") -> str:
    return ", ".join(f"{prefix}{k}: saved {saved.get(k)}, now {now.get(k)}" for k in keys
                     if saved.get(k) != now.get(k))


def check_layout(path: str, layout: Dict) -> bool:
    """Whether the run described by ``layout`` (``Trainer.layout()``) can resume from ``path``; raises one
    :class:`CheckpointError` line (the same on every rank, before anything loads) when it cannot. Returns
    True when the parallel layout is the one saved (then each rank's own RNG and probe state is restored too).

    Refused: another model (any ``model`` field or the precision); another optimizer kind; another number of
    virtual pipeline stages, or another PP size with virtual stages (resharding those is not verified here);
    another TP or PP size when the optimizer state was saved in the dp_reshardable format (the default; Megatron
    cannot convert it, Megatron-LM refuses it too), or other DDP buckets at the saved TP/PP sizes (that format is
    laid out by bucket: Megatron would stop on an assertion). Resharded by Megatron: any change of DP size (and world size);
    TP and PP with the fully_reshardable format or the replicated optimizer (its state is in model space)."""
    saved = read_layout(path)
    where = f"cannot resume from {path}"
    if saved is None:  # saved before layout.json existed: only the same number of ranks
        world = layout.get("world_size")
        saved_ranks = len([f for f in os.listdir(path) if f.startswith("rank_") and f.endswith(".pt")])
        if saved_ranks != world:
            raise CheckpointError(
                f"{where}: it holds no layout.json and the state of {saved_ranks} ranks, and this run has {world}: "
                f"resume with {saved_ranks} ranks, or load the weights alone (megatron_bottleneck.train."
                "load_model_only) in a new run (checkpoint.resume=false or another checkpoint.dir).")
        return True
    new_run = "or start a new run (another checkpoint.dir, or checkpoint.resume=false)"
    has_optimizer = saved.get(OPTIMIZER_SAVED, True)
    saved_model, model = saved.get("model"), layout.get("model")
    if saved_model is not None and model is not None and saved_model != model:
        keys = list(dict.fromkeys([*saved_model, *model]))
        what = _changes(saved_model, model, keys)
        fix = " ".join(f"{k}={json.dumps(saved_model.get(k))}" for k in keys if saved_model.get(k) != model.get(k))
        raise CheckpointError(f"{where}: it was saved with another model ({what}). Resume with the saved "
                              f"settings ({fix}), {new_run}.")
    if has_optimizer and saved.get("distributed_optimizer") != layout.get("distributed_optimizer"):
        a = saved.get("distributed_optimizer")
        raise CheckpointError(
            f"{where}: it was saved with parallel.distributed_optimizer={str(a).lower()} and this run has "
            f"{str(layout.get('distributed_optimizer')).lower()}, whose optimizer state has another form. Resume "
            f"with parallel.distributed_optimizer={str(a).lower()}, {new_run}.")
    fmt = saved.get("optimizer_format", OLD_OPTIMIZER_FORMAT)
    buckets, now_buckets = saved.get("ddp_buckets"), layout.get("ddp_buckets")
    if (has_optimizer and saved.get("distributed_optimizer") and fmt == "dp_reshardable" and buckets is not None
            and now_buckets is not None and buckets != now_buckets
            and all(saved.get(k) == layout.get(k) for k in PARALLEL_KEYS[1:4])):
        size = saved.get("ddp_bucket_size")
        fix = (f"parallel.ddp_bucket_size={size}" if size is not None else
               "parallel.overlap_grad_reduce=false and parallel.ddp_bucket_size=null (one bucket per buffer)")
        raise CheckpointError(
            f"{where}: its optimizer state is in Megatron's dp_reshardable format, laid out by DDP bucket, and this "
            f"run's buckets differ (parameters per bucket: saved {size}, now {layout.get('ddp_bucket_size')}; the "
            f"default, max(40M, 1M x DP) with overlap, grows with the data-parallel size above 40). Resume with "
            f"{fix}, {new_run}.")
    if all(saved.get(k) == layout.get(k) for k in PARALLEL_KEYS):
        return True
    what = _changes(saved, layout, PARALLEL_KEYS)
    tp_pp = [k for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size") if saved.get(k) != layout.get(k)]
    vpp = "virtual_pipeline_model_parallel_size"
    if saved.get(vpp) != layout.get(vpp) or ("pipeline_model_parallel_size" in tp_pp and layout.get(vpp)):
        raise CheckpointError(
            f"{where}: it was saved with another pipeline layout ({what}) and resharding across virtual pipeline "
            f"stages is not supported here. Resume with the saved TP/PP/VPP sizes (any data-parallel size), {new_run}.")
    if tp_pp and has_optimizer and saved.get("distributed_optimizer") and fmt != "fully_reshardable":
        raise CheckpointError(
            f"{where}: its optimizer state is in Megatron's {fmt} format, which reshards over data-parallel ranks "
            f"only, and the model-parallel layout changed ({what}). Resume with the saved TP/PP sizes (any "
            f"data-parallel size), {new_run}; to change them, resume at the saved sizes with "
            f"checkpoint.optimizer_format=fully_reshardable and resume its next checkpoint at the new ones.")
    return False


def _load_model(chunks: List, state: Dict) -> None:
    """Strict: every parameter and buffer of each chunk comes from the checkpoint and nothing is left over."""
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=True)


def load_checkpoint(path: str, chunks: List, optimizer=None, layout: Optional[Dict] = None) -> Dict:
    """Load the model into ``chunks`` and the optimizer state (resharded to this run's layout where
    :func:`check_layout` allows it) and return the extra state: this rank's own when the layout is the saved
    one, else rank 0's without its per-rank part (``PER_RANK``). ``same_layout`` in it says which;
    ``optimizer_reset`` whether the checkpoint holds no optimizer state (layout.json's ``optimizer_saved`` false):
    then the optimizer keeps its fresh state and its main weights are reloaded from the model;
    ``optimizer_reset_params`` the parameters whose saved state is fresh (layout.json's, as ``convert-head``
    writes it for the new head; empty otherwise)."""
    same = check_layout(path, layout) if layout is not None else True
    saved = read_layout(path) or {}
    fmt = saved.get("optimizer_format", OLD_OPTIMIZER_FORMAT) if saved.get("distributed_optimizer", True) else None
    reset = optimizer is not None and not saved.get(OPTIMIZER_SAVED, True)
    loaded_optimizer = None if reset else optimizer
    state = dist_checkpointing.load(_full_state(chunks, loaded_optimizer, is_loading=True, fmt=fmt), path)
    _load_model(chunks, state["model"])
    if loaded_optimizer is not None:
        _load_optimizer(optimizer, state["optimizer"], fmt)
    elif reset:  # fresh Adam state; the main (fp32) weights from the loaded model, as Megatron-LM's --no-load-optim
        optimizer.reload_model_params()
    rank = dist.get_rank() if dist.is_initialized() else 0
    extra = torch.load(os.path.join(path, f"rank_{rank if same else 0}.pt"), weights_only=False)
    if not same:
        extra.pop(PER_RANK, None)
    extra["same_layout"] = same
    extra["optimizer_reset"] = reset
    extra[OPTIMIZER_RESET_PARAMS] = list(saved.get(OPTIMIZER_RESET_PARAMS) or []) if optimizer is not None else []
    return extra


def load_model_only(path: str, chunks: List) -> None:
    """Load just the model weights (any TP/PP layout), strictly."""
    _load_model(chunks, dist_checkpointing.load(_model_state(chunks), path))


def read_saved_state(path: str) -> Dict:
    """The state of the checkpoint at ``path`` that is the same on every rank (iteration, sample count,
    scheduler: ``rank_0.pt`` without its per-rank part), read before anything loads."""
    extra = torch.load(os.path.join(path, "rank_0.pt"), weights_only=False)
    extra.pop(PER_RANK, None)
    return extra
