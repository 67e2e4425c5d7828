"""The contract between :class:`~.probe.GradientProbe` (the front) and its two strategies.

The front owns everything that is the same for every head: the hooks on the head, the step boundaries
(``begin_step`` / ``end_step`` and the micro-batch count), the MTP depth selection, the one SUM all-reduce of a
step's payload with its failure flag, reporting and the fail-together protocol. A :class:`ProbeStrategy` owns the
measurement of one kind of head, chosen once in ``watch_head``:

* :class:`~.closed_form.ClosedFormStrategy`: heads whose logits are linear in their weight (``probe_view``):
  the closed form of :mod:`.stats` and the Gram of :mod:`.spectrum`;
* :class:`~.cg.CGStrategy`: :class:`~megatron_bottleneck.base.head.NonLinearHead` heads: a token sample
  measured by conjugate gradients through the head's ``log_prob_fn`` (:mod:`.general`).

A strategy's life per optimizer step: :meth:`ProbeStrategy.new_plan` (first head forward of the step), then per
micro-batch :meth:`ProbeStrategy.forward` (accumulate: it hooks the backward pass, local work only, plus the
collectives listed there), then :meth:`ProbeStrategy.close` once (the step's last backward: the local payload),
then after the front's reduction :meth:`ProbeStrategy.device_figures` (or, on a rank that failed,
:meth:`ProbeStrategy.matching_collectives`) and :meth:`ProbeStrategy.host_figures` (finalise).

Fail-together rule for every method: the collectives a strategy enters follow from shapes, the plan and the
config alone, never from whether this rank's local work succeeded; local work runs through the host's ``_try``
(an exception flags the rank and is swallowed), and a collective is entered with zeros of the same shape where the
work that should have filled it failed.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_size

from ..base.head import HeadView

__all__ = ["Plan", "Shape", "MicroBatch", "ClosedStep", "ProbeHost", "ProbeStrategy", "gathered"]


@dataclass
class Plan:
    """What a step measures; decided at its first micro-batch, the same on every rank. ``fused``,
    ``sequence_parallel`` and ``watch_hidden`` (the head's loss is fused; the head input is sequence-sharded; dL/dH is
    hooked) are filled by the step's forwards."""

    cheap: bool
    update: bool
    rank: bool
    fused: bool = False
    watch_hidden: bool = False
    sequence_parallel: bool = False

    @property
    def any(self) -> bool:
        return self.cheap or self.update or self.rank


@dataclass
class Shape:
    """k (basis width), d (head input width), r (mix rows; None for a dense head), V_local, padded."""

    k: int
    d: int
    r: Optional[int]
    v_local: int
    padded: bool


@dataclass
class MicroBatch:
    """One probed micro-batch: what its hooks share. ``pending`` hooks must fire before it counts (the front's
    ``_microbatch_hook_done``); ``opened`` tags the step it belongs to (the front's ``_opened`` at its forward)."""

    fused: bool
    rows: int  # tokens of the head input on this rank ([s(/tp), b] flattened)
    watch_hidden: bool = False  # a hook on dL/dH (then two hooks fire per micro-batch)
    slice_rows: int = 0  # fused: tokens whose G is recomputed (update / rank)
    gram_rows: int = 0  # tokens entering the rank figures
    view: Optional[HeadView] = None
    hidden: Optional[torch.Tensor] = None
    full_hidden: Optional[torch.Tensor] = None
    record: Any = None  # closed form: the fused pass's record; CG: this micro-batch's token sample
    pending: int = 2
    opened: int = 0
    capped: Optional[torch.Tensor] = None  # closed form, unfused head with a softcap: its output x = c tanh(z / c)


@dataclass
class ClosedStep:
    """A step whose backward is done: its local ``payload`` (None where this rank failed), of the part lengths
    ``sizes`` (from shapes and the plan alone: a failed rank knows them too), waiting for ``end_step``. ``state``
    is the strategy's own (its accumulators; None for a step that carries only the failure flag)."""

    step: int
    sizes: Tuple[int, ...]
    payload: Optional[torch.Tensor]
    state: Any = None


class ProbeHost(Protocol):
    """What a strategy uses of the front (:class:`~.probe.GradientProbe`)."""

    config: Any  # ProbeConfig
    tp_group: Any
    _opened: int  # steps opened so far: a micro-batch's tag

    def _try(self, fn: Callable, *args) -> Any:
        """Run local work; an exception flags this rank for the step (not re-raised), returns None."""

    def _fail(self, exc: BaseException) -> None:
        """Flag this rank for the step (the first failure is kept)."""

    def _timed(self) -> AbstractContextManager:
        """Context for a hook's work (benchmarking: ``time_hooks``)."""

    def _microbatch_hook_done(self, mb: MicroBatch) -> None:
        """One of ``mb``'s backward hooks has run (the micro-batch counts when all have)."""

    def _device(self) -> torch.device:
        """The head's device."""


class ProbeStrategy(Protocol):
    """How one kind of head is measured: accumulate per micro-batch, reduce once per step, finalise."""

    kind: str
    """``"linear"`` or ``"general"``, as :attr:`~megatron_bottleneck.base.head.HeadSpec.probe` names them."""
    keeps_fused_record: bool
    """Whether a probed step asks an :class:`~megatron_bottleneck.base.head.LMHead` to keep its fused-pass record."""
    shape: Optional[Shape]
    """The head's shapes (:meth:`measure_shape`), None before its first training forward."""

    def measure_shape(self, head: torch.nn.Module, weight: Optional[torch.Tensor]) -> Shape:
        """The head's shapes at its first training forward (``weight``: a tied head's, passed as an argument);
        stored in :attr:`shape`. Local; no collective. Raises where the head cannot be measured (the same on
        every rank: the front switches off without agreement)."""

    def new_plan(self, cheap: bool, update: bool, rank: bool) -> Plan:
        """The plan of a step opening now (``rank``: the rank figures are due by the interval); drops the previous
        step's per-step state. Host work only; no collective."""

    def forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor, plan: Plan) -> None:
        """Accumulate one micro-batch: called from the head's forward hook of a probed step (``output``: its logits
        or fused loss, requiring grad). Registers the backward hooks that accumulate the step's local sums, each
        ending with the host's ``_microbatch_hook_done``. Collectives, entered by every TP rank whatever failed:
        the SP all-gather of the head input (closed form: update figures; CG: while the token sample fills) and,
        closed form on a padded vocabulary, the padding correction's all-reduce in the output-gradient hook."""

    def has_payload(self, plan: Plan) -> bool:
        """Whether the step, now closing, has sums to reduce (the same on every rank: plan and shapes alone)."""

    def close(self, plan: Plan, step: int) -> ClosedStep:
        """The step's last backward is done (before any optimizer step): build the local payload. Closed form: no
        collective; CG: the conjugate gradients' fixed sequence of JVP / VJP collectives, zeros where this rank's
        sample failed."""

    def device_figures(self, closed: ClosedStep, flat: torch.Tensor) -> Tuple[List[str], torch.Tensor]:
        """After the front's SUM all-reduce (``flat``: the reduced payload, flag removed): the figures as
        (names, one flat float64 tensor) on the device. Closed form: the per-bucket all-reduce under SP."""

    def matching_collectives(self, closed: ClosedStep) -> None:
        """On a rank that failed (or whose :meth:`device_figures` raised): the collectives a healthy rank's
        :meth:`device_figures` enters, with zeros."""

    def host_figures(self, closed: ClosedStep, names: List[str], host: torch.Tensor) -> Dict[str, Any]:
        """The record from :meth:`device_figures`'s values after their one host transfer. Local."""

    def reset(self) -> None:
        """Drop all per-step state (the probe switched off)."""

    def state_dict(self) -> Optional[Dict]:
        """State carried across steps, for a checkpoint (closed form: a Gram spanning steps)."""

    def load_state_dict(self, state: Optional[Dict], device: torch.device) -> None:
        """Restore :meth:`state_dict`'s state (None: start afresh)."""


def gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    """All-gather a sequence-sharded [s/tp, b, D] tensor along dim 0 (no autograd)."""
    world = get_pg_size(group)
    if world == 1:
        return hidden.detach()
    h = hidden.detach().contiguous()
    out = torch.empty((h.shape[0] * world,) + tuple(h.shape[1:]), dtype=h.dtype, device=h.device)
    dist.all_gather_into_tensor(out, h, group=group)
    return out


def gathered(host: ProbeHost, hidden: torch.Tensor, sp: bool) -> torch.Tensor:
    """The head input over the full sequence: all-gathered under SP (every TP rank enters the all-gather, with
    zeros of the same shape where its probe work failed this step), else the input itself."""
    if not sp:
        return hidden.detach()
    local = host._try(lambda: hidden.detach().contiguous())
    if local is None:
        local = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    return gather_sequence(local, host.tp_group)
