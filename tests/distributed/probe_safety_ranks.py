"""Rank functions for tests/distributed/test_probe_safety.py: host syncs, failing together, fused-model memory."""
from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megatron_bottleneck as mb
from megatron_bottleneck.probe.stats import StepAccumulator
from tests import support


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (what ``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor
    dispatch to), leaving out Megatron's own CPU-RNG-state check in ``tensor_parallel/random.py`` (it compares
    host tensors, which is no device synchronisation on a GPU either)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.where = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "megatron" in f.filename]
            if not any(f.filename.endswith("tensor_parallel/random.py") for f in frames):
                self.count += 1
                self.where[" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in frames[-2:])] += 1
        return func(*args, **(kwargs or {}))


def sync_counts(tp: int, steps: int = 4) -> Dict:
    """A TP GPT with the fused low-rank head and the probe's cheap figures every 2nd step: syncs per step in
    the schedule (forward-backward) and in ``probe.end_step()``."""
    cfg, chunks = support.build_chunks(tp, 1, None, False, 16)
    mb.heads.enable_fused_loss(chunks)
    probe = mb.GradientProbe(mb.ProbeConfig(interval=2, vocab_size=support.VOCAB))
    probe.watch(chunks, num_microbatches=support.NUM_MICRO)
    models = support.wrap_ddp(cfg, chunks)
    counts: List = []
    where = collections.Counter()
    for step in range(steps):
        probe.step = step
        schedule, end = SyncCounter(), SyncCounter()
        with schedule:
            result = mb.forward_backward(models, support.batches(step))
        with end:
            probe.end_step()
        counts.append((schedule.count, end.count))
        where.update(schedule.where)
        assert result.loss is not None
    return {"counts": counts, "where": dict(where), "recorded": [h["step"] for h in probe.history]}


class ProbeFault(RuntimeError):
    pass


def failing_rank(tp: int, sp: bool, fail_rank: int, probe_on: bool, steps: int = 3) -> Dict:
    """TP(+SP) GPT with a padded vocabulary (real 251 of 256) and the probe on every step; on ``fail_rank``
    the probe's hidden-gradient work raises at step 1 (an injected fault: an OOM, say)."""
    from megatron.core import parallel_state as ps

    cfg, chunks = support.build_chunks(tp, 1, None, sp, 16)
    models = support.wrap_ddp(cfg, chunks)
    probe = None
    if probe_on:
        probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, vocab_size=support.VOCAB - 5))
        probe.watch(models, num_microbatches=support.NUM_MICRO)
    original = StepAccumulator.add_hidden_grad
    me = ps.get_tensor_model_parallel_rank()

    def faulty(self, *args, **kwargs):
        if probe is not None and probe.step == 1 and me == fail_rank:
            raise ProbeFault("injected")
        return original(self, *args, **kwargs)

    StepAccumulator.add_hidden_grad = faulty
    losses, enabled = [], []
    log = CollectiveLog()
    try:
        for step in range(steps):
            with log:
                result = mb.forward_backward(models, support.batches(step))
                if probe is not None:
                    probe.end_step()
                    enabled.append(probe.enabled)
            losses.append(result.losses)
            with torch.no_grad():
                for m in models:
                    for p in m.module.parameters():
                        p.add_(p.main_grad, alpha=-0.5)
    finally:
        StepAccumulator.add_hidden_grad = original
    return {"losses": losses, "enabled": enabled, "steps": [h["step"] for h in probe.history] if probe else [],
            "error": probe.last_error if probe else None, "collectives": log.calls}


class LogitSizedAllocations(TorchDispatchMode):
    """Records every op output whose last dimension is the vocab shard and which holds at least ``tokens``
    rows of it: a materialised ``[s, b, V/tp]`` (or ``[s*b, V/tp]``) tensor."""

    def __init__(self, tokens: int, v_local: int):
        super().__init__()
        self.tokens, self.v_local, self.seen = tokens, v_local, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.v_local \
                    and t.numel() >= self.tokens * self.v_local:
                self.seen.append((str(func), tuple(t.shape)))
        return out


MICRO = 4  # T = 64 tokens per micro-batch: more than the hidden size (32), so [T, V] and [D, V] differ


def wide_batches(seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(support.NUM_MICRO):
        tokens = torch.randint(0, support.VOCAB, (MICRO, support.SEQ + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def fused_update_rank(tp: int, fused: bool, slice_mib: float, track: bool = False, rank_budget: int = 0) -> Dict:
    """Update and rank figures every step on a fused (or unfused) model; optionally the logit-sized
    allocations of the step (the update figures' P = H^T G is [D, V/tp]: weight-sized, not logit-sized)."""
    cfg, chunks = support.build_chunks(tp, 1, None, False, 16)
    if fused:  # vocab chunks of 64 rows: the op's own working tensor stays below [T, V] at these tiny sizes
        mb.heads.enable_fused_loss(chunks, mb.heads.FusedLossConfig(memory_budget_mib=64 * 8 * support.SEQ * MICRO / 2 ** 20))
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, rank_interval=1,
                                            rank_token_budget=rank_budget or support.SEQ * MICRO * support.NUM_MICRO,
                                            vocab_size=support.VOCAB, slice_memory_mib=slice_mib))
    probe.watch(chunks, num_microbatches=support.NUM_MICRO)
    models = support.wrap_ddp(cfg, chunks)
    tracker = LogitSizedAllocations(support.SEQ * MICRO, support.VOCAB // tp)
    if track:
        with tracker:
            mb.forward_backward(models, wide_batches())
            probe.end_step()
    else:
        mb.forward_backward(models, wide_batches())
        probe.end_step()
    return {"history": probe.history, "logit_sized": tracker.seen}


class CollectiveLog(TorchDispatchMode):
    """Every collective this rank enters, as ``(op, ((shape, dtype), ...))`` of its tensor arguments, in order:
    the c10d ops ``torch.distributed`` dispatches (``c10d.allreduce_``, ``c10d._allgather_base_``, ...), whoever
    calls them (the probe, the head's autograd functions, Megatron's mappings)."""

    def __init__(self):
        super().__init__()
        self.calls: List = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("c10d."):
            tensors = []

            def visit(a):
                if isinstance(a, torch.Tensor):
                    tensors.append((tuple(a.shape), str(a.dtype)))
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        visit(b)
            visit(args)
            self.calls.append((str(func), tuple(tensors)))
        return func(*args, **(kwargs or {}))


FAULT_STAGES = ("forward", "backward", "cg", "end")
"""Where the injected fault hits the general probe (rank 1, step 1): the forward hook's token sample, the backward
hook on the head's output, the conjugate gradients (mid-way: the 5th dot product of the step's CG), the figures
after end_step's reduction. ("host": the host figures after end_step's one sync, on one rank: told to every rank by
the next step's reduction.)"""


@contextlib.contextmanager
def _fault(stage: Optional[str], when):
    """Make the probe's work at ``stage`` raise ProbeFault while ``when()`` holds (None: no fault)."""
    from megatron_bottleneck.probe import cg, general

    target = {"forward": (cg.CGStrategy, "_take_sample"),
              "backward": (cg.CGStrategy, "_keep_grad"),
              "cg": (general, "_dot"), "end": (cg, "figures_from_sums"),
              "host": (cg.CGStrategy, "host_figures"), None: None}[stage]
    if target is None:
        yield
        return
    owner, name = target
    original = getattr(owner, name)
    calls = [0]

    def faulty(*args, **kwargs):
        if when():
            calls[0] += 1
            if stage != "cg" or calls[0] == 5:
                raise ProbeFault("injected")
        return original(*args, **kwargs)

    setattr(owner, name, faulty)
    try:
        yield
    finally:
        setattr(owner, name, original)


def general_failing_rank(fail_rank: int = 1, steps: int = 3) -> Dict:
    """TP=2 (and TP=2 + SP): a non-linear head driven through its fused loss (mos, labels from its loss context)
    and unfused (sigsoftmax, Megatron's vocab-parallel cross-entropy of its log-probabilities), two micro-batches
    a step and an SGD step on the head's parameters after each; the general probe (cheap + update figures) on
    every step. Per case (kind, fused, sp) and stage (None: no fault; "off": no probe; "boundary": steps opened
    by ``begin_step``, step 1's on every rank with a count of 1 for its 2 micro-batches; else a fault on
    ``fail_rank`` at step 1 at that stage): the losses, the probe's state after each step, its records and
    last_error, and every collective this rank entered."""
    from tests import support_heads as sh

    mb.initialize_parallel(2, 1, seed=5)
    _group, tp, rank = sh._tp()
    out = {}
    for kind, fused in sh.PROBE_CASES:
        for sp in (False, True):
            for stage in ("off", None) + FAULT_STAGES + ("host", "boundary"):
                head = sh.build(kind, tp, sp).double()
                head.train()
                gen = torch.Generator().manual_seed(13)
                probe = None
                if stage != "off":
                    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, general_tokens=20,
                                                            general_iterations=2 * sh.D))
                    probe.watch_head(head, num_microbatches=2)
                log = CollectiveLog()
                losses, enabled = [], []
                for step in range(steps):
                    hs = [torch.randn(sh.S, sh.B, sh.D, generator=gen, dtype=torch.float64) for _ in range(2)]
                    ys = [torch.randint(0, sh.V_REAL, (sh.S, sh.B), generator=gen) for _ in range(2)]
                    when = lambda s=step: s == 1 and rank == fail_rank  # noqa: E731
                    with _fault(None if stage in ("off", "boundary") else stage, when), log:
                        if stage == "boundary":  # explicit steps; step 1's count disagrees with its 2 micro-batches
                            probe.begin_step(1 if step == 1 else 2)
                        for h, y in zip(hs, ys):
                            x = sh._local(h, rank, tp, sp).clone().requires_grad_(True)
                            loss = sh.head_loss_of(head, x, y, fused).mean() / 2
                            loss.backward()
                            losses.append(loss.item())
                        if probe is not None:
                            probe.end_step()
                            enabled.append(probe.enabled)
                    with torch.no_grad():
                        for p in head.parameters():
                            p.add_(p.grad, alpha=-0.5)
                            p.grad = None
                out[f"{kind} fused={fused} sp={sp} {stage}"] = {
                    "losses": losses, "enabled": enabled, "collectives": log.calls,
                    "steps": [h["step"] for h in probe.history] if probe else [],
                    "error": probe.last_error if probe else None}
                if probe is not None:
                    probe.remove()
    mb.destroy_parallel()
    return out
