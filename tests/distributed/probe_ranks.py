"""Rank functions for the GradientProbe tests: real GPTModel steps through the schedule driver.

The reference is independent of the probe: a second tensor hook captures each micro-batch's logit
gradient, the test gathers the vocab shards (which the probe never does) and computes every figure by
brute force in float64 (QR of the full W, explicit projections, SVD).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

import megatron_bottleneck as mb
from tests import support as pr


def _capture(model_chunks, store: List):
    """Independent capture of (G shard, H, W shard) per micro-batch for the reference."""
    head = mb.find_head(model_chunks)
    if head is None:
        return None

    def fwd(module, args, output):
        logits = output[0]
        h = args[0].detach().clone()
        # W in float64 from its factors: a float32 product A B is numerically full rank.
        w = (module.weight.double() @ module.input_proj.double() if hasattr(module, "input_proj")
             else module.weight.double()).detach().clone()
        if logits.requires_grad:
            logits.register_hook(lambda g: store.append((g.detach().clone(), h, w)))

    return head.register_forward_hook(fwd)


def _gather_vocab(t: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def reference_figures(captured, tp_group, vocab_size: int, sp: bool) -> Dict[str, float]:
    """Brute force over the whole step: gather G (T x V) and W (V x D), QR, projections, SVD."""
    gs, hs, ws = [], [], []
    for g, h, w in captured:
        gs.append(_gather_vocab(g, tp_group).reshape(-1, g.shape[-1] * dist.get_world_size(tp_group)))
        if sp:
            parts = [torch.empty_like(h) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, h.contiguous(), group=tp_group)
            h = torch.cat(parts, 0)
        hs.append(h.reshape(-1, h.shape[-1]))
        parts = [torch.empty_like(w) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, w.contiguous(), group=tp_group)
        ws.append(torch.cat(parts, 0))
    G = torch.cat(gs).double()[:, :vocab_size]
    H = torch.cat(hs).double()
    W = ws[-1].double()[:vocab_size]
    Q, _ = torch.linalg.qr(W)
    rank = int(torch.linalg.matrix_rank(W))
    Q = Q[:, :rank]
    vis = G @ Q @ Q.t()
    gn = G.norm()
    P = H.t() @ G
    dZ = G @ W @ W.t() + H @ P
    return {
        "grad_norm": gn.item(),
        "hidden_grad_norm": (G @ W).norm().item(),
        "destroyed_ratio": ((G - vis).norm() / gn).item(),
        "visible_cosine": (vis.norm() / gn).item(),
        "isotropic_baseline": (1 - rank / (vocab_size - 1)) ** 0.5,
        "update_cosine": ((G * dZ).sum() / (gn * dZ.norm())).item(),
    }


def probed_training(tp: int, pp: int, sp: bool, rank, steps: int, probe_on: bool, log_dir: str,
                    nan_step: int = -1) -> Dict:
    """``steps`` SGD steps through Megatron's schedule; the probe on or off; NaN injected at a step."""
    from megatron.core import parallel_state as ps

    cfg, chunks = pr.build_chunks(tp, pp, None, sp, rank)
    models = pr.wrap_ddp(cfg, chunks)
    probe = None
    if probe_on:
        probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, log_dir=log_dir,
                                                vocab_size=pr.VOCAB - 5))
        probe.watch(models, num_microbatches=pr.NUM_MICRO)
    captured: List = []
    handle = _capture(models, captured) if probe_on else None
    losses, refs = [], []
    tp_group = ps.get_tensor_model_parallel_group()
    for step in range(steps):
        data = pr.batches(step)
        poison = step == nan_step

        def forward_step(it, model):
            output, loss_func = mb.gpt_forward_step(it, model)

            def poisoned(out):
                loss, report = loss_func(out)
                return loss * float("nan"), {"loss": report["loss"] * float("nan")}

            return output, (poisoned if poison else loss_func)

        captured.clear()
        result = mb.forward_backward(models, data, forward_step=forward_step)
        if probe is not None:
            probe.end_step()
        if ps.is_pipeline_last_stage():
            losses.append(result.loss)
            if probe_on and not poison:
                refs.append(reference_figures(captured, tp_group, pr.VOCAB - 5, sp and tp > 1))
        with torch.no_grad():
            for m in models:
                for p in m.module.parameters():
                    if torch.isfinite(p.main_grad).all():
                        p.add_(p.main_grad, alpha=-0.5)
    if handle is not None:
        handle.remove()
    return {
        "losses": losses,
        "history": probe.history if probe is not None else [],
        "refs": refs,
        "reporter": bool(probe is not None and probe.is_reporter),
        "last_stage": ps.is_pipeline_last_stage(),
    }
