"""``GradientProbe``: measure the LM-head gradient bottleneck on the real training step.

The front. ``watch(model)`` hooks the head (``output_layer``) of the model chunk that holds it (last pipeline
stage; elsewhere the probe stays idle) and picks, once, the strategy that measures it (:mod:`.strategy`):
:class:`~.closed_form.ClosedFormStrategy` for a head whose logits are linear in its weight, :class:`~.cg.CGStrategy`
for a :class:`~megatron_bottleneck.base.head.NonLinearHead`. On a step due for measurement the strategy accumulates
each micro-batch from backward hooks (local work, bar collectives every TP rank enters at the same point), builds
its local sums when the step's last micro-batch has gone through backward, and finalises the figures after the
front's reduction.

Step boundaries: :meth:`GradientProbe.begin_step` opens an optimizer step of ``n`` micro-batches (that step's own
count: batch-size ramp-up is followed) and :meth:`GradientProbe.end_step` ends it (the schedule driver
:func:`~megatron_bottleneck.integrations.schedule.forward_backward`, hence the trainer; the Megatron-LM
``train_step`` wrap; the Bridge callback). Inside an open step forwards and backwards may come in any order
(combined 1F1B, interleaved pipelines): the plan and token sample are decided at the step's first forward, and the
step closes (before any optimizer step) when its ``n``-th micro-batch has finished backward. A count that
disagrees with the schedule is a failure, the same on every TP rank: the step closes with its failure flag and the
probe switches off everywhere (``last_error``), never a hang. A loop that calls no ``begin_step`` gets a step
opened by its first head forward, of ``watch``'s ``num_microbatches``.

End of step and failing together (:mod:`.reduction`): :meth:`GradientProbe.end_step` does one SUM all-reduce over
the head's TP group (a failure flag first) and one host transfer, once per recorded step (the next step's first
forward, or :meth:`remove`, calls it if nobody did). An exception in any rank's probe code is caught there
(``_try``; training never stops for it); that rank still enters every collective, with zeros and its flag set (the
strategies' contract: collectives follow from shapes and the plan alone), so every rank of the group learns of it
from the same reduction and switches off (``_disable``).

Reporting: the figures describe the micro-batches of data-parallel rank 0 and are logged by rank 0 of its
tensor-parallel group among the ranks of data x context parallel rank 0 (``is_reporter``).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.errors import ConfigError
from ..base.groups import default_dp_cp_group, default_tp_group
from ..base.head import find_head, head_view, is_lm_head, is_nonlinear_head
from ..base.sinks import MetricsLogger
from .cg import CGStrategy
from .closed_form import ClosedFormStrategy
from .config import ProbeConfig
from .mtp import MTPSelector
from .reduction import reduce_step
from .strategy import ClosedStep, MicroBatch, Plan, ProbeStrategy

log = logging.getLogger(__name__)

__all__ = ["GradientProbe", "ProbeConfig", "head_view"]


def _megatron_num_microbatches() -> int:
    try:
        return int(get_num_microbatches())
    except Exception:  # calculator not initialised: one micro-batch per step
        return 1


class GradientProbe:
    """Measures how much of the logit gradient survives the LM head, during training."""

    def __init__(self, config: Optional[ProbeConfig] = None, tp_group=None, dp_group=None,
                 logger=None, **overrides):
        self.config = config or ProbeConfig(**overrides)
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.step = 0
        self.num_microbatches = 1  # of the open (or last) step
        self._default_microbatches: Optional[int] = 1  # watch's count for a step no begin_step opened
        self._open = False  # a step is open: begun, not yet closed
        self._explicit = False  # ... by begin_step (end_step checks that it completed)
        self._opened = 0  # steps opened so far (tags each micro-batch with its step)
        self._forwards = 0  # head forwards of the open step
        self.enabled = True
        self.time_hooks = False  # benchmarking: accumulate the time spent in the probe in `seconds`
        self.seconds = 0.0
        self.history: List[Dict[str, float]] = []
        self.last_error: Optional[str] = None
        self._logger = logger
        self._handles = []
        self._head = None
        self._strategy: Optional[ProbeStrategy] = None  # picked in watch_head
        self._saved: Optional[Dict] = None  # load_state_dict's strategy state, before watch_head
        self._seen = 0
        self._plan: Optional[Plan] = None
        self._failed: Optional[BaseException] = None
        self._closed: Optional[ClosedStep] = None
        self._was_reporter = False
        self._callbacks: List[Callable[[int, Dict[str, float]], None]] = []
        self._mtp: Optional[MTPSelector] = None  # the model has MTP depths: which head call is measured

    # ------------------------------------------------------------------ setup
    def watch(self, model, num_microbatches: Optional[int] = None) -> "GradientProbe":
        """Attach to the head of ``model`` (a module or list of chunks); idempotent.

        ``num_microbatches``: micro-batches per optimizer step of a step that no :meth:`begin_step` opened (a
        hand-written loop); default None: Megatron's num-microbatches calculator, read when each such step
        opens, else 1. A driver that calls :meth:`begin_step` passes each step's count there instead.
        """
        self._default_microbatches = None if num_microbatches is None else int(num_microbatches)
        if self._head is not None:
            return self
        head = find_head(model)
        if head is None:
            return self  # not the last pipeline stage: idle
        self.watch_head(head, num_microbatches)
        mtp = MTPSelector(model, head, self.config.mtp_depth)
        if mtp.handle is not None:
            self._mtp = mtp
            self._handles.append(mtp.handle)
        return self

    def watch_head(self, head: torch.nn.Module, num_microbatches: Optional[int] = 1) -> "GradientProbe":
        """Attach to a head module directly: a head whose logits are linear in its weight (closed form), or a
        :class:`~megatron_bottleneck.base.head.NonLinearHead` (the general path: its ``log_prob_fn``; a
        head implementing neither is refused with HeadConfigError in one line). ``num_microbatches`` as in
        :meth:`watch`."""
        self._default_microbatches = None if num_microbatches is None else int(num_microbatches)
        if self._head is not None:
            return self
        cfg = self.config
        if is_nonlinear_head(head):
            if not (self.enabled and (cfg.interval or cfg.update_interval or cfg.rank_interval)):
                return self  # nothing is due, ever: stay idle
            strategy: ProbeStrategy = CGStrategy(self, head)
        else:
            strategy = ClosedFormStrategy(self)
        self._head, self._strategy = head, strategy
        self.tp_group = default_tp_group(self.tp_group or getattr(head, "tp_group", None))
        self.dp_group = default_dp_cp_group(self.dp_group)
        if self._saved is not None:
            strategy.load_state_dict(self._saved, self._device())
            self._saved = None
        self._handles.append(head.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self._head.register_forward_hook(self._on_forward, with_kwargs=True))
        return self

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict:
        """What the probe carries from one step to the next, for a checkpoint of this rank: the step and the
        rank figures' Gram accumulation when it spans steps (``rank_token_budget`` above one step's tokens).
        It is this rank's own (its TP shard of the vocabulary, its DP rank's tokens): restore it only at the
        layout it was saved from. Call it between steps (after :meth:`end_step`)."""
        gram = self._saved if self._strategy is None else self._strategy.state_dict()
        return {"step": self.step, "gram": gram}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`'s state (``{"step": n}`` alone restarts the accumulation at step n: what
        a resume at another layout does; the next ``rank_interval`` step starts a new Gram on every rank)."""
        self.step = int(state.get("step") or 0)
        saved = state.get("gram") if self.enabled else None
        if self._strategy is None:
            self._saved = saved  # handed to the strategy when watch_head picks it
        else:
            self._strategy.load_state_dict(saved, self._device())

    def on_record(self, fn: Callable[[int, Dict[str, float]], None]) -> None:
        """Also call ``fn(step, figures)`` for every finalised step, on every rank that probes (the
        Megatron-LM integration writes to Megatron-LM's own TensorBoard / W&B writers this way, on the
        rank that owns them)."""
        self._callbacks.append(fn)

    def remove(self) -> None:
        """Finish a pending step, detach from the head and close the logs (``is_reporter`` keeps its value)."""
        self.end_step()
        self._was_reporter = self.is_reporter
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._head is not None and is_lm_head(self._head):
            self._head.loss_request.record = False
        self._head = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    def _warn_if_vocab_unknown(self, head) -> None:
        """Megatron pads V to a multiple of 128 x TP; without the real size the padded columns would count."""
        if self.config.vocab_size is not None or is_lm_head(head):
            return
        total = self._strategy.shape.v_local * get_pg_size(self.tp_group)
        if total % 128 == 0:
            log.warning("GradientProbe: the real vocabulary size is unknown, so its figures count all %d columns "
                        "of the head, which may include Megatron's padding (and then differ across TP sizes). "
                        "Pass ProbeConfig(vocab_size=<tokenizer vocab size>).", total)

    @property
    def is_reporter(self) -> bool:
        if self._head is None:
            return self._was_reporter
        return get_pg_rank(self.tp_group) == 0 and get_pg_rank(self.dp_group) == 0

    # ------------------------------------------------------------- hooks
    @contextmanager
    def _timed(self):
        if not self.time_hooks:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0

    def _try(self, fn, *args):
        """Run local probe work; an exception marks this rank failed for the step (no re-raise)."""
        if self._failed is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # never break training: the TP group learns of it at end_step
            self._failed = exc
            return None

    def _fail(self, exc: BaseException) -> None:
        """Flag this rank for the step (the first failure is kept; the TP group learns of it at end_step)."""
        self._failed = self._failed or exc

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _before_forward(self, module, args, kwargs):
        """A head forward in training: open a step if no :meth:`begin_step` did (finishing the previous one if
        nobody did), count the forward (one more than the step's micro-batches is a failure), decide the step's
        plan at its first forward and tell a head implementing the contract whether to keep a record of its
        fused pass."""
        if not self.enabled:  # a switched-off probe leaves the head alone (one enabled probe per head decides)
            return None
        if self._mtp is not None and not self._mtp.count_call(module):
            return None
        if not (module.training and torch.is_grad_enabled()):
            if is_lm_head(module):
                module.loss_request.record = False
            return None
        if self._strategy.shape is None:
            try:
                self._strategy.measure_shape(module, kwargs.get("weight"))
            except Exception as exc:  # the same on every rank: nothing to agree on
                self._disable(exc)
                return None
            self._warn_if_vocab_unknown(module)
        with self._timed():
            if (self._open and self._forwards >= self.num_microbatches) or (not self._open and self._explicit):
                self._mismatch(f"a head forward beyond the step's {self.num_microbatches} micro-batches")
            if not self._open and not self._explicit:
                n = self._default_microbatches
                self._open_step(_megatron_num_microbatches() if n is None else n, explicit=False)
            if not (self.enabled and self._open):  # switched off, or a forward beyond a begun step's count
                if is_lm_head(module):
                    module.loss_request.record = False
                return None
            self._forwards += 1
            if self._plan is None:
                cfg = self.config
                self._plan = self._strategy.new_plan(cheap=self._due(cfg.interval),
                                                     update=self._due(cfg.update_interval),
                                                     rank=self._due(cfg.rank_interval))
            if is_lm_head(module):
                module.loss_request.record = self._plan.any and self._strategy.keeps_fused_record
        return None

    def _on_forward(self, module, args, kwargs, output):
        """A head forward in training: hand a probed micro-batch to the strategy (which hooks its backward); an
        unprobed one counts now."""
        with self._timed():
            plan = self._plan
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if not (self.enabled and self._open and module.training and torch.is_grad_enabled()):
                return None
            if self._mtp is not None and not self._mtp.measured:
                return None
            if not (plan is not None and plan.any and isinstance(logits, torch.Tensor) and logits.requires_grad):
                self._count_microbatch()
                return None
            self._strategy.forward(module, args, kwargs, logits, plan)
        return None

    def _microbatch_hook_done(self, mb: MicroBatch) -> None:
        mb.pending -= 1
        if mb.pending == 0:
            self._count_microbatch(mb)

    def _count_microbatch(self, mb: Optional[MicroBatch] = None) -> None:
        """A micro-batch of the open step is done (its backward hooks have fired, or, unprobed, its forward ran):
        the step closes with its ``num_microbatches``-th."""
        if not self._open or (mb is not None and mb.opened != self._opened):
            return  # a micro-batch of a step already closed after a mismatch: its failure is on record
        self._seen += 1
        if self._seen >= self.num_microbatches:
            self._finish_step()

    # ------------------------------------------------------------- step boundaries
    def begin_step(self, num_microbatches: Optional[int] = None) -> None:
        """Open an optimizer step of ``num_microbatches`` micro-batches (None: Megatron's
        ``get_num_microbatches()`` now, else 1), on every rank, before the step's schedule runs; :meth:`end_step`
        after it. The count is this step's own (read it afresh each step: batch-size ramp-up changes it), so the
        step closes after exactly that many micro-batches have gone through the head's backward, in whatever
        order the schedule runs their forwards and backwards. A previous step that was not ended is ended first
        (one that had not finished its micro-batches is a failure: the probe switches off on every rank of its TP
        group, ``last_error`` says so). Host work only: no device synchronisation."""
        n = _megatron_num_microbatches() if num_microbatches is None else int(num_microbatches)
        if n < 1:
            raise ConfigError(f"GradientProbe.begin_step: num_microbatches must be >= 1, got {num_microbatches}")
        if self._open and self._forwards and not self._explicit:
            self._mismatch(f"a step began before the previous one's {self.num_microbatches} micro-batches finished "
                           f"backward ({self._seen} did)")
        self.end_step()
        self._open_step(n, explicit=True)

    def _open_step(self, num_microbatches: int, explicit: bool) -> None:
        if self._closed is not None:  # the previous step's end_step, if nobody called it
            self.end_step()
        self._open, self._explicit = self.enabled, explicit and self.enabled
        self.num_microbatches = num_microbatches
        self._opened += 1
        self._seen = self._forwards = 0
        self._plan = None

    def _finish_step(self, force: bool = False) -> None:
        """Close the open step: build its payload for :meth:`end_step` when it measured something (``force``: in
        any case, a step failing on a mismatch: its flag must reach every rank)."""
        self._open = False
        plan, self._plan = self._plan, None
        if plan is not None and (force or self._strategy.has_payload(plan)):
            self._closed = self._strategy.close(plan, self.step)
        elif force:
            self._flag_only_step()
        self.step += 1

    def _flag_only_step(self) -> None:
        """A closed step carrying nothing but the failure flag (a mismatch where the step measured nothing)."""
        if self._closed is None:
            self._closed = ClosedStep(step=self.step, sizes=(), payload=None)

    def _mismatch(self, what: str) -> None:
        """The micro-batches the schedule ran disagree with the step's count. The same on every TP rank (they run
        the same schedule with the same count), so closing the step now, flagged, is a collective-safe failure:
        the next :meth:`end_step` switches the probe off on every rank of the group."""
        self._failed = self._failed or RuntimeError(
            f"step boundaries: {what} (begin_step / watch said {self.num_microbatches} per step; pass each step's "
            f"own count)")
        if self._open:
            self._finish_step(force=True)
        else:
            self._flag_only_step()

    # ------------------------------------------------------------- step end
    def end_step(self) -> Optional[Dict[str, float]]:
        """Finish the last closed step: one SUM all-reduce over the TP group (failure flag, partial sums, Gram),
        the figures on the device, one transfer to the host, then the record (or, if any rank of the group
        failed, the probe switched off on all of them). Returns the figures (None when nothing was pending).
        Call it on every rank after the step's forward-backward; it is a no-op when no step is pending.

        It ends a step :meth:`begin_step` opened: one whose micro-batches have not all finished backward is a
        failure (closed with its flag, the probe switched off on every rank of its TP group); one in which the
        head ran no forward (a skipped iteration, a rank without the head) just counts."""
        if self._open and self._explicit:
            if self._forwards and self.enabled:
                self._mismatch(f"end_step after {self._seen} of the step's {self.num_microbatches} micro-batches "
                               f"finished backward")
            else:
                self._open, self._plan = False, None
                if self._head is not None:
                    self.step += 1
        self._explicit = False
        closed, self._closed = self._closed, None
        if closed is None:
            return None
        with self._timed():
            names, host, error = reduce_step(closed, self._strategy, self.tp_group, self._device(),
                                             failed_before=self._failed is not None)
            self._failed = self._failed or error
            if float(host[0]) > 0 or self._failed is not None:
                self._disable(self._failed or RuntimeError("the probe failed on another tensor-parallel rank"))
                return None
            try:
                out = self._strategy.host_figures(closed, names, host)
            except Exception as exc:  # after the sync, on this rank only: the next step's reduction tells every
                self._failed = exc  # rank (the flag), so all switch off together; this step's record is dropped
                return None
        if out:
            try:
                self._record(closed.step, out)
            except Exception as exc:  # a callback or log write: as above, every rank switches off at the next step
                self._failed = exc
        return out

    def _device(self) -> torch.device:
        head = self._head
        p = next(head.parameters(), None) if head is not None else None
        return p.device if p is not None else torch.device("cpu")

    def _record(self, step: int, figures: Dict[str, float]) -> None:
        self.history.append({"step": step, **figures})
        for fn in self._callbacks:
            fn(step, figures)
        if self.is_reporter:
            if self._logger is None and self.config.log_dir:
                self._logger = MetricsLogger(self.config.log_dir, "probe.jsonl", self.config.tensorboard,
                                             self.config.wandb_project)
            if self._logger is not None:
                self._logger.log(step, figures, prefix="probe/")

    def _disable(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("GradientProbe switched off on every rank of its tensor-parallel group after an error "
                    "(training continues): %s", self.last_error)
        self.enabled = False
        if self._head is not None and is_lm_head(self._head):  # the head goes back to its plain fused path
            self._head.loss_request.record = False
        if self._strategy is not None:
            self._strategy.reset()
        self._failed = None
        self._open = self._explicit = False
        self._plan = None
