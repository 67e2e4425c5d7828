"""The probe's one reduction per recorded step, and its one host transfer: how the TP group fails together.

``flat`` = [flag, payload] (float64, ``1 + sum(closed.sizes)`` values) is SUM all-reduced over the head's TP group:
the flag is 1 on a rank that failed before the reduction (its payload is zeros: every rank enters the same
collective with the same shape). The strategy turns the reduced payload into device figures; a rank whose figures
fail enters the strategy's matching collectives instead, and a one-value all-reduce (the late flag) tells every rank
of it before the host transfer. ``host[0] > 0`` afterwards means some rank of the group failed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_size

from .strategy import ClosedStep, ProbeStrategy


def reduce_step(closed: ClosedStep, strategy: ProbeStrategy, tp_group, device: torch.device,
                failed_before: bool) -> Tuple[List[str], torch.Tensor, Optional[BaseException]]:
    """Reduce a closed step over ``tp_group`` and bring its figures to the host.

    Returns ``(names, host, error)``: ``host`` a float64 CPU tensor whose element 0 is the group's failure count
    and the rest the figures called ``names[1:]`` (``names[0]`` is the flag; empty when this rank has no figures),
    ``error`` this rank's own failure here (a payload of the wrong size, or the figures raising), else None.
    Collectives: one all-reduce of ``flat``, the strategy's figure collectives (or their matching ones), and under
    TP > 1 the late flag's all-reduce, entered by every rank whatever failed."""
    error: Optional[BaseException] = None
    total = sum(closed.sizes)
    failed = closed.payload is None or failed_before
    if not failed and closed.payload.numel() != total:  # a layout bug: a failure, never a size mismatch
        error, failed = RuntimeError(f"probe payload has {closed.payload.numel()} values, expected {total}"), True
    flat = torch.zeros(1 + total, dtype=torch.float64, device=device)  # the failure flag first
    if failed:
        flat[0] = 1.0
    else:
        flat[1:] = closed.payload.to(device)
    tp = get_pg_size(tp_group)
    if tp > 1:
        dist.all_reduce(flat, group=tp_group)
    names: List[str] = []
    values = flat[:1]
    if not failed:
        try:
            fig_names, vec = strategy.device_figures(closed, flat[1:])
            names, values = ["_flag"] + fig_names, torch.cat([flat[:1], vec.to(flat.device)])
        except Exception as exc:  # the figures failed on this rank: it still enters their collectives
            error = exc
    if not names:
        strategy.matching_collectives(closed)
    if tp > 1:
        # a failure after the reduction (the figures) on one rank: every rank of the group learns of it
        late = torch.full((1,), 1.0 if not names and not failed else 0.0, dtype=torch.float64, device=device)
        dist.all_reduce(late, group=tp_group)
        values = torch.cat([values[:1] + late.to(values.device), values[1:]])
    return names, values.cpu(), error  # .cpu(): the probe's one host synchronisation of the step
