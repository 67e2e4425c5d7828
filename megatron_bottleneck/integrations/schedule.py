"""The one Megatron schedule driver: micro-batches through ``get_forward_backward_func``, loss reduction,
``finalize_model_grads``. The trainer, the tests, the benchmarks and the examples all step through
:func:`forward_backward`.

A batch is a dict with ``tokens`` and ``labels`` (``[b, s]`` int64) and optionally ``loss_mask``
(``[b, s]``, 1 = counted) and ``position_ids``; :func:`gpt_forward_step` turns it into GPTModel's per-token
losses and their masked mean. Pass your own ``forward_step(data_iterator, model) -> (output, loss_func)``
to drive anything else (Megatron's contract).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

__all__ = ["forward_backward", "gpt_forward_step", "StepResult", "wire_overlap", "sync_params"]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def gpt_forward_step(data_iterator, model):
    """Megatron ``forward_step`` for GPTModel on dict batches: masked mean of the per-token losses."""
    batch = next(data_iterator)
    dev = _device()
    tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=dev).expand(tokens.shape[0], -1)
    mask = batch.get("loss_mask")
    mask = None if mask is None else mask.to(dev).float()
    output = model(tokens, positions.to(dev), None, labels=labels)

    def loss_func(per_token):
        per_token = per_token.float()
        loss = per_token.mean() if mask is None else (per_token * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach().clone()}

    return output, loss_func


class StepResult:
    """``losses``: this rank's per-micro-batch losses (last pipeline stage only, else None);
    ``loss``: their mean averaged over data-parallel ranks (last stage only, else None).

    The values stay on the device until first read: :func:`forward_backward` itself makes no host
    synchronisation; reading ``losses`` or ``loss`` makes one (both together)."""

    def __init__(self, values: Optional[torch.Tensor] = None, count: int = 0):
        self._values = values  # [count per-micro-batch losses, DP mean], float64
        self._count = count
        self._host: Optional[List[float]] = None

    def _read(self) -> Optional[List[float]]:
        if self._values is None:
            return None
        if self._host is None:
            self._host = self._values.tolist()
        return self._host

    @property
    def losses(self) -> Optional[List[float]]:
        host = self._read()
        return None if host is None else host[: self._count]

    @property
    def loss(self) -> Optional[float]:
        host = self._read()
        return None if host is None or not self._count else host[-1]


def _one(fns: List) -> "Callable | List[Callable]":
    return fns[0] if len(fns) == 1 else fns


def wire_overlap(models: "torch.nn.Module | Sequence[torch.nn.Module]") -> None:
    """Set the model config's hooks that Megatron's schedules call for overlapped data-parallel communication,
    as Megatron-LM's training loop does, when the Megatron DDP wrappers ask for it: with ``overlap_grad_reduce``,
    ``no_sync_func`` (buckets count gradients only in the last micro-batch, so each reduce launches when its
    bucket is complete) and ``grad_sync_func`` (the pipeline schedules launch a chunk's reduce after its last
    backward); with ``overlap_param_gather`` and ``align_param_gather``, ``param_sync_func`` (the interleaved
    schedule launches each chunk's all-gather). Hooks the caller set are left alone (hooks this function set for
    other wrappers of the same config are replaced); no-op for models without Megatron DDP."""
    chunks = list(models) if isinstance(models, (list, tuple)) else [models]
    ddp = getattr(chunks[0], "ddp_config", None)
    if ddp is None:
        return
    config = get_model_config(chunks[0])
    ids = [id(c) for c in chunks]
    wired = getattr(config, "_mb_overlap_chunks", None)  # the chunks this function wired the config for
    if wired == ids:
        return
    if wired is not None:  # wired for other wrappers of this config: start again
        config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    if ddp.overlap_grad_reduce and config.no_sync_func is None:
        config.no_sync_func = _one([c.no_sync for c in chunks])
        if config.grad_sync_func is None:
            config.grad_sync_func = _one([c.start_grad_sync for c in chunks])
    if (ddp.use_distributed_optimizer and ddp.overlap_param_gather and getattr(ddp, "align_param_gather", False)
            and config.param_sync_func is None):
        config.param_sync_func = _one([c.start_param_sync for c in chunks])
    config._mb_overlap_chunks = ids


def sync_params(models: "torch.nn.Module | Sequence[torch.nn.Module]") -> None:
    """Finish the distributed optimizer's parameter all-gather now (blocking) when it is overlapped with the
    next forward (``overlap_param_gather``): after ``optimizer.step()`` the modules hold the new weights only
    once it has run. Call it before reading weights outside a forward (a checkpoint save, the end of training).
    No-op otherwise."""
    for c in (list(models) if isinstance(models, (list, tuple)) else [models]):
        ddp = getattr(c, "ddp_config", None)
        if ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather:
            c.start_param_sync(force_sync=True)


def forward_backward(
    models: "torch.nn.Module | Sequence[torch.nn.Module]",
    batches: Sequence,
    *,
    forward_step: Callable = gpt_forward_step,
    forward_only: bool = False,
    seq_length: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    finalize: bool = True,
    param_sync: bool = True,
    probe=None,
) -> StepResult:
    """One step over ``batches`` (one per micro-batch) through Megatron's pipeline schedule.

    ``models``: a Megatron-DDP-wrapped model or its virtual-pipeline chunks. Unless ``forward_only``, the
    grad buffers are zeroed first and, with ``finalize``, ``finalize_model_grads`` runs after (data-parallel
    and layer-norm/SP all-reduces). ``seq_length`` / ``micro_batch_size`` default to the first batch's
    ``tokens`` shape (needed by pipeline communication).

    Megatron DDP overlapping its communication (``overlap_grad_reduce`` / ``overlap_param_gather``) gets the
    schedule hooks it needs (:func:`wire_overlap`). ``param_sync=False`` runs this step without the overlapped
    parameter all-gather (no forward pre-hooks, no ``param_sync_func``), as Megatron-LM does for the first step
    of a run: the weights are already in place then.

    ``probe`` (a :class:`~megatron_bottleneck.probe.GradientProbe`, training steps only): the step's boundaries,
    ``probe.begin_step(len(batches))`` before the schedule and ``probe.end_step()`` (its one reduction and host
    transfer) after it, so the probe's step is this step whatever order the schedule runs the micro-batches in.
    """
    chunks = list(models) if isinstance(models, (list, tuple)) else [models]
    wire_overlap(chunks)
    args = (chunks, batches, forward_step, forward_only, seq_length, micro_batch_size, finalize)
    probe = None if forward_only else probe
    if probe is not None:
        probe.begin_step(len(batches))
    if param_sync:
        result = _forward_backward(*args)
    else:
        config = get_model_config(chunks[0])
        held, config.param_sync_func = config.param_sync_func, None
        unhooked = [m for m in chunks if getattr(m, "use_forward_hook", False) and m.remove_forward_pre_hook_handles]
        for m in unhooked:
            m.disable_forward_pre_hook(param_sync=False)
        try:
            result = _forward_backward(*args)
        finally:
            config.param_sync_func = held
            for m in unhooked:
                m.enable_forward_pre_hook()
    if probe is not None:
        probe.end_step()
    return result


def _forward_backward(chunks, batches, forward_step, forward_only, seq_length, micro_batch_size,
                      finalize) -> StepResult:
    if seq_length is None or micro_batch_size is None:
        shape = batches[0]["tokens"].shape
        micro_batch_size = micro_batch_size or shape[0]
        seq_length = seq_length or shape[1]
    if not forward_only:
        for m in chunks:
            m.zero_grad_buffer()
    iters = [iter(batches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    if finalize and not forward_only:
        finalize_model_grads(chunks)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return StepResult()
    losses = [(o["loss"] if "loss" in o else next(iter(o.values()))) for o in out if o]
    if not losses:  # a forward_step whose loss_func reports nothing
        return StepResult(torch.zeros(0, dtype=torch.float64), 0)
    values = torch.stack([torch.as_tensor(x, device=_device()).reshape(()).double() for x in losses])
    mean = values.mean().reshape(1)
    dp = parallel_state.get_data_parallel_group()
    if dist.is_initialized() and dist.get_world_size(dp) > 1:
        dist.all_reduce(mean, group=dp)
        mean /= dist.get_world_size(dp)
    return StepResult(torch.cat([values, mean]), len(losses))
