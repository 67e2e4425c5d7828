"""``megatron-bottleneck bench-train``: throughput, step-time shares, MFU and peak memory of the trainer.

Runs ``steps`` training steps (after ``warmup`` unmeasured ones) of a config, no checkpoints, and reports per
rank and aggregated:

* tokens/s (global batch tokens over the median step time of the slowest rank);
* step-time shares (of the mean step), where measurable: **head+loss** (from the head's forward pre-hook to the end of the
  model's forward, plus from the start of backward to the gradient reaching the head input), **probe** (time
  inside the probe's hooks and reductions), **grad sync** (``finalize_model_grads``: data-parallel and
  sequence-parallel all-reduces), **optimizer** (the step, including the distributed optimizer's all-gather),
  and **backbone** (the rest of forward/backward, tensor-parallel communication included: it overlaps compute
  and is not separable here);
* MFU: model FLOPs per token, 6 x (matmul parameters) + 12 x layers x seq x hidden (attention), times
  tokens/s, over a matrix-multiply peak measured in the same run (``peak_gflops``: best of a few
  square GEMMs in the training dtype on each rank);
* peak memory: CUDA ``max_memory_allocated`` on GPUs; on CPUs the process's peak RSS.

Where: ``train.device`` (:func:`~megatron_bottleneck.base.device.resolve_device`), under torchrun or on ``nproc``
local ranks: one GPU per rank when visible (NCCL), else CPU ranks (gloo, CPU mode); ``train.device=cuda`` without
the GPUs is one error line before any rank starts. On GPUs the hooks synchronise the device so that their times
are real (a small cost, for benchmarking only).
``head_ranks`` runs one configuration per head rank (``None`` = dense) and returns one row each; ``fp8_recipes``
(e.g. ``[None, "delayed", "tensorwise"]``) does the same per backbone FP8 recipe (``model.fp8``), rank within recipe,
so BF16 and FP8 steps are compared in one run. ``overlaps`` (e.g. ``[False, True]``) does the same per setting of
data-parallel communication overlap (``parallel.overlap_grad_reduce`` and, with the distributed optimizer,
``parallel.overlap_param_gather``); each row then has ``vs_no_overlap``, its tokens/s over the matching row without
overlap. With overlap, **grad sync** is the exposed part of the reduce (what ``finalize_model_grads`` still waits
for) and the parameter all-gather moves from **optimizer** into the forward.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import resource
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from .base.head import find_head
from .integrations.launch import launch
from .integrations.schedule import forward_backward
from .train import TrainConfig, Trainer
from .train.trainer import init_distributed

__all__ = ["bench_train", "model_flops_per_token", "matmul_peak_gflops", "format_table"]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_flops_per_token(cfg: TrainConfig) -> float:
    """Training FLOPs per token: 6 x matmul parameters (layers and head; embeddings are lookups) plus
    attention scores and values, 12 x layers x seq x hidden (no causal discount)."""
    m = cfg.model
    d, layers = m.hidden_size, m.num_layers
    kv = (m.num_query_groups or m.num_attention_heads) * (d // m.num_attention_heads)
    ffn = m.ffn_hidden_size or 4 * d
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * ffn  # QKV, output projection, SwiGLU
    head = m.vocab_size * d if m.head_rank is None else m.head_rank * (m.vocab_size + d)
    return 6.0 * (layers * per_layer + head) + 12.0 * layers * m.seq_length * d


def matmul_peak_gflops(dtype: torch.dtype, size: Optional[int] = None, reps: int = 5) -> float:
    """Best GFLOP/s of ``size``^3 matrix multiplies in ``dtype`` on this device."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = size or (8192 if dev == "cuda" else 1024)
    a = torch.randn(size, size, device=dev).to(dtype)
    b = torch.randn(size, size, device=dev).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync()
        t0 = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


class _Timers:
    """Head+loss timing from module and tensor hooks (see the module docstring)."""

    def __init__(self, model_chunks):
        self.head_loss = 0.0
        self._t = {}
        self._handles = []
        head = find_head(model_chunks)
        if head is None:
            return
        chunk = next(c for c in reversed(model_chunks) if find_head(c) is head)
        module = getattr(chunk, "module", chunk)
        self._handles.append(head.register_forward_pre_hook(self._head_start))
        self._handles.append(module.register_forward_hook(self._model_end))

    def _head_start(self, _module, args):
        _sync()
        self._t["fwd"] = time.perf_counter()
        hidden = args[0]
        if hidden.requires_grad:
            hidden.register_hook(self._hidden_grad)

    def _model_end(self, _module, _args, output):
        _sync()
        if "fwd" in self._t:
            self.head_loss += time.perf_counter() - self._t.pop("fwd")
        if torch.is_tensor(output) and output.requires_grad:
            output.register_hook(self._backward_start)

    def _backward_start(self, grad):
        self._t["bwd"] = time.perf_counter()

    def _hidden_grad(self, grad):
        _sync()
        if "bwd" in self._t:
            self.head_loss += time.perf_counter() - self._t.pop("bwd")

    def remove(self):
        for h in self._handles:
            h.remove()


def _bench_rank(cfg_dict: Dict, steps: int, warmup: int) -> Dict:
    cfg = TrainConfig.from_dict(cfg_dict)
    trainer = Trainer(cfg)
    probe = trainer.probe
    if probe is not None:
        probe.time_hooks = True
    timers = _Timers(trainer.models)
    stream = trainer.batches("train")
    rows = []
    for step in range(warmup + steps):
        if probe is not None:
            probe.step, probe.seconds = step, 0.0
        timers.head_loss = 0.0
        for m in trainer.models:
            m.train()
        trainer.optimizer.zero_grad()
        batch = [next(stream) for _ in range(trainer.num_micro)]
        _sync()
        t0 = time.perf_counter()
        forward_backward(trainer.models, batch, seq_length=cfg.model.seq_length,
                         micro_batch_size=cfg.train.micro_batch_size, finalize=False)
        _sync()
        t1 = time.perf_counter()
        finalize_model_grads(trainer.models)
        _sync()
        t2 = time.perf_counter()
        trainer.optimizer.step()
        _sync()
        t3 = time.perf_counter()
        if step >= warmup:
            probe_s = probe.seconds if probe is not None else 0.0
            rows.append({"step": t3 - t0, "head_loss": timers.head_loss, "probe": probe_s, "grad_sync": t2 - t1,
                         "optimizer": t3 - t2, "backbone": (t1 - t0) - timers.head_loss - probe_s})
    timers.remove()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    peak = matmul_peak_gflops(trainer.tcfg.params_dtype)
    if torch.cuda.is_available():
        memory = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    out = {"rank": dist.get_rank() if dist.is_initialized() else 0, "world": world, "median_s": med, "mean_s": mean,
           "overlap_grad_reduce": trainer.options.overlap_grad_reduce,
           "overlap_param_gather": trainer.options.overlap_param_gather, "backend": trainer.options.backend,
           "tokens_per_s": tokens / med["step"], "peak_gflops": peak, "peak_memory_mib": memory,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    out["mfu"] = model_flops_per_token(cfg) * out["tokens_per_s"] / (world * peak * 1e9)
    gathered = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, out)
    else:
        gathered = [out]
    return gathered


def bench_train(config: TrainConfig, steps: int = 10, warmup: int = 2, nproc: Optional[int] = None,
                head_ranks: Sequence[Optional[int]] = (), fp8_recipes: Sequence[Optional[str]] = (),
                overlaps: Sequence[bool] = ()) -> List[Dict]:
    """One row per (FP8 recipe, head rank, overlap) (or one for the config as it is): per-rank figures and their
    aggregate.

    Every configuration is validated before the first one runs, so a bad rank or recipe fails in one line first."""
    rows, configs = [], []
    for recipe in (fp8_recipes or [config.model.fp8]):
        for rank in (head_ranks or [config.model.head_rank]):
            for overlap in (overlaps or [None]):
                d = copy.deepcopy(config.to_dict())
                d["model"].update(head_rank=rank, fp8=recipe)
                d["checkpoint"]["dir"] = None  # a benchmark saves nothing
                if overlap is not None:
                    d["parallel"].update(overlap_grad_reduce=bool(overlap), overlap_param_gather=bool(overlap) and (
                        d["parallel"]["distributed_optimizer"]))
                configs.append(TrainConfig.from_dict(d))  # checks the recipe's name
    for cfg in configs:
        cfg.checkpoint.dir = None
        cfg.train.train_steps = max(cfg.train.train_steps, steps + warmup)
        cfg.train.eval_interval = 0
        cfg.logging.console = False
        cfg.validate()
    for cfg in configs:
        p = cfg.parallel
        world = nproc or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: these are the ranks
            init_distributed(cfg.train.device)
            per_rank = _bench_rank(cfg.to_dict(), steps, warmup)
        else:
            cfg.check_world(world)
            per_rank = launch(functools.partial(_bench_rank, cfg.to_dict(), steps, warmup), world,
                              timeout=24 * 3600, device=cfg.train.device, option="train.device")[0]
        rows.append(_aggregate(cfg, per_rank))
    for row in rows:  # tokens/s over the same configuration without overlap
        base = next((r for r in rows if not r["overlap_grad_reduce"] and not r["overlap_param_gather"]
                     and (r["head_rank"], r["fp8"]) == (row["head_rank"], row["fp8"])), None)
        row["vs_no_overlap"] = None if base is None else row["tokens_per_s"] / base["tokens_per_s"]
    return rows


def _aggregate(cfg: TrainConfig, per_rank: List[Dict]) -> Dict:
    slowest = max(per_rank, key=lambda r: r["median_s"]["step"])
    mean = slowest["mean_s"]  # shares from means: they add up to the step
    shares = {k: mean[k] / mean["step"] for k in mean if k != "step"}
    return {"head_rank": cfg.model.head_rank, "fp8": cfg.model.fp8, "world": slowest["world"],
            "overlap_grad_reduce": slowest["overlap_grad_reduce"], "overlap_param_gather": slowest["overlap_param_gather"],
            "backend": slowest["backend"], "step_s": slowest["median_s"]["step"],
            "tokens_per_s": slowest["tokens_per_s"], "mfu": slowest["mfu"], "shares": shares,
            "peak_gflops_min": min(r["peak_gflops"] for r in per_rank),
            "peak_memory_mib_max": max(r["peak_memory_mib"] for r in per_rank),
            "flops_per_token": model_flops_per_token(cfg), "per_rank": per_rank}


def format_table(rows: List[Dict]) -> str:
    head = ("| head rank | fp8 | ranks | overlap | step (s) | tokens/s | vs no overlap | MFU | head+loss | probe | "
            "grad sync | optimizer | backbone | peak GFLOP/s | peak memory (MiB) |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        s = r["shares"]
        overlap = "+".join(n for n, k in (("grad", "overlap_grad_reduce"), ("param", "overlap_param_gather"))
                           if r.get(k)) or "off"
        ratio = f"{r['vs_no_overlap']:.2f}x" if r.get("vs_no_overlap") is not None else "-"
        lines.append(f"| {r['head_rank'] or 'dense'} | {r.get('fp8') or 'off'} | {r['world']} | {overlap} | "
                     f"{r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{100 * r['mfu']:.2f}% | {100 * s['head_loss']:.1f}% | {100 * s['probe']:.1f}% | "
                     f"{100 * s['grad_sync']:.1f}% | {100 * s['optimizer']:.1f}% | {100 * s['backbone']:.1f}% | "
                     f"{r['peak_gflops_min']:.1f} | {r['peak_memory_mib_max']:.0f} |")
    return "\n".join(lines)


def write_json(rows: List[Dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
