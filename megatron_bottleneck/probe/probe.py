"""``GradientProbe``: measure the LM-head gradient bottleneck on the real training step.

How it works. ``watch(model)`` puts a forward pre-hook and a forward hook on the head (``output_layer``) of the
model chunk that holds it (last pipeline stage; elsewhere the probe stays idle). On a step due for
measurement, the forward hook registers tensor hooks so the backward pass hands over, per micro-batch:

* unfused head (logits exist): the logit gradient G (its vocab shard) and dL/dH at the head input;
* fused head + loss (:class:`~megatron_bottleneck.base.head.LMHead` with a
  :class:`~megatron_bottleneck.base.loss.FusedLossRecord`): dL/dloss_t, from which the fused pass's statistics
  give ||dL/dz_t||^2 exactly (no logits), and dL/dH. Update and rank figures need G itself: the probe
  recomputes it (:func:`megatron_bottleneck.ops.logit_grad_rows`) for a *token slice* of each micro-batch, at most
  ``slice_memory_mib`` of float32 ``[tokens, V/tp]``, so a probed step stays within the fused path's memory.

* non-linear head (:class:`~megatron_bottleneck.base.head.NonLinearHead`, no ``probe_view``): the general path
  (:mod:`.general`). The forward hook keeps a token sample, the first ``general_tokens`` rows of the step (head
  input over the full sequence ``[n, D]``, all-gathered under SP; on the fused path also the labels from the
  head's ``loss_context``), and hooks the head's output: unfused, dL/du ``[s, b, V/tp]`` (u = log p; this rank's
  real columns of the sample's rows are kept, ``[n, n_valid]``); fused, dL/dloss_t ``[s, b]``, with
  G = dL/dloss_t (p - q) rebuilt from the labels. After the step's last backward (before any optimizer step)
  :func:`.general.head_sums` runs ``general_iterations`` CG iterations, each a JVP and a VJP through the head's
  ``log_prob_fn`` (TP collectives inside, a fixed number: every TP rank enters them, with zeros where its probe
  work failed), and gives the sums (visible energy, ||G||^2, max residual, update inner product and norm), the
  same on every TP rank: TP rank 0 puts them in the payload, the others zeros. Figures: ``grad_norm``,
  ``destroyed_ratio``, ``visible_cosine``, ``cg_residual``, ``update_cosine`` (update steps), ``probe_tokens``,
  all describing the sample. No rank figures.

The math (:mod:`.stats`, :mod:`.spectrum`, :mod:`.general`) does local work only inside the hooks (the general
path's JVP / VJP collectives excepted, entered by every TP rank at the same point): no host synchronisation and
no collective that can be skipped (the one collective in a hook, the padding correction of an unfused head
over a padded vocabulary, is entered by every TP rank whatever happened before it). When the step's last
micro-batch has gone through backward, each rank builds its local partial sums (still on the device).

Step boundaries come from whoever drives the schedule: :meth:`GradientProbe.begin_step` opens an optimizer step
of ``n`` micro-batches (the count of *that* step: Megatron's ``get_num_microbatches()`` read afresh, so
batch-size ramp-up is followed) and :meth:`GradientProbe.end_step` ends it (the schedule driver
:func:`~megatron_bottleneck.integrations.schedule.forward_backward` given ``probe=``, hence the trainer; the
Megatron-LM ``train_step`` wrap; the Bridge callback's step hooks). Inside an open step the head's forwards and
backwards may come in any order the schedule likes (forwards running ahead of backwards: combined 1F1B with
expert-parallel overlap, interleaved pipelines): the step's plan and token sample are decided once, at its
first forward, and the step closes (its partial sums built, before any optimizer step) when its ``n``-th
micro-batch has finished backward. Counting is a consistency check only: more head forwards than ``n``, or an
explicitly begun step that has not finished ``n`` micro-batches at ``end_step``, is a failure (the same on every
TP rank, as the schedule is): the step is closed with its failure flag and the probe switches off everywhere
(``last_error`` says so), never a hang. A loop that calls no ``begin_step`` (a hand-written one) gets a step
opened by its first head forward, of ``watch``'s ``num_microbatches`` (default: Megatron's calculator at that
moment, else 1).

:meth:`GradientProbe.end_step`, after the schedule, does the rest: one SUM all-reduce over the head's TP group
of everything (with a failure flag), the figures on the device, and one transfer to the host: the only host
synchronisation of the probe, once per recorded step. Call it after each step's forward-backward (the trainer,
the Bridge and Lightning callbacks and the Megatron-LM integration do); otherwise the next step's first forward
calls it, and :meth:`remove` calls it for the last step.

Failing together: an exception in any rank's probe code is caught there (training never stops for it); that
rank still enters every collective, with zeros and its flag set, so at ``end_step`` every rank of the TP group
learns of it from the same reduction and switches its probe off: no stall, no rank left alone in a collective.
The collectives a rank enters follow from shapes and the plan alone: on the general path its zeros take the
peers' branch of :func:`.general.head_sums` (labels on the fused path), whose local work between collectives is
guarded (``errors``) so a failure mid-CG still makes the remaining JVP / VJP collectives; the SP all-gather of
the token sample is entered with zeros where the sample failed; a failure in the figures after ``end_step``'s
reduction is agreed in a one-value all-reduce before the host transfer. (An exception inside the head's own
``log_prob_fn`` between two of its collectives cannot be repaired from outside it.)

Reporting: the figures describe the micro-batches of data-parallel rank 0 and are logged by rank 0 of its
tensor-parallel group among the ranks of data x context parallel rank 0 (``is_reporter``).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.errors import ConfigError, HeadConfigError
from ..base.groups import default_dp_cp_group, default_tp_group
from ..base.head import HeadView, find_head, head_view, is_lm_head, is_nonlinear_head
from ..base.loss_spec import softcap_slope
from ..base.sinks import MetricsLogger
from ..ops.linear_cross_entropy import logit_grad_rows, slice_rows
from .general import SUM_NAMES, figures_from_sums, head_sums
from .spectrum import GramAccumulator
from .stats import StepAccumulator

log = logging.getLogger(__name__)

__all__ = ["GradientProbe", "ProbeConfig", "head_view"]


@dataclass
class ProbeConfig:
    """What to measure and how often. Intervals count optimizer steps; 0 disables."""

    interval: int = 1
    """Cheap figures (norms, destroyed ratio, visible cosine, isotropic baseline) every N steps."""
    update_interval: int = 0
    """Update-direction cosine cos(-G, dZ) every N steps (one extra T x D x V/tp product per micro-batch)."""
    rank_interval: int = 0
    """Rank figures of G (Gram-based) every N steps, accumulated up to ``rank_token_budget`` tokens."""
    rank_token_budget: int = 2048
    """Tokens gathered for the rank figures (cost grows as T^2 V)."""
    rank_rtol: Optional[float] = None
    """Numerical-rank tolerance relative to sigma_max; None: max(T, V) x eps of the gradient's dtype."""
    energy_ks: Sequence[int] = (1, 10, 100, 1000)
    """k of the reported ``energy_top{k}`` (share of ||G||^2 in the top-k singular values)."""
    num_buckets: int = 0
    """Destroyed ratio per token-position bucket (0: off)."""
    vocab_size: Optional[int] = None
    """Real (unpadded) vocabulary; columns beyond it are Megatron's padding and excluded. None: the head's
    ``vocab_size`` (head contract) if it has one, else its full (padded) size, with a warning when that is padded."""
    slice_memory_mib: float = 64.0
    """Fused head + loss only: update and rank figures come from the logit gradient of the first tokens of each
    micro-batch, recomputed in at most this many MiB of float32 ``[tokens, V/tp]`` (update figures then describe
    that token slice: ``update_tokens`` says how many)."""
    log_dir: Optional[str] = None
    """Where ``probe.jsonl`` (and ``tensorboard/``) go; None: keep figures in ``history`` only."""
    tensorboard: bool = True
    """Also write TensorBoard events (skipped with one warning when tensorboard is not installed)."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project (skipped with one warning when wandb is not installed)."""
    general_tokens: int = 256
    """Non-linear heads (the general probe, :mod:`.general`): the figures of a step describe its first
    ``general_tokens`` tokens (the first micro-batches' rows in order, full sequence: the same tokens on every TP
    rank; ``probe_tokens`` says how many). Their head input ``[n, D]`` (and, unfused, G's shard ``[n, V/tp]``)
    is kept until the step's last backward."""
    mtp_depth: int = 0
    """Multi-token prediction (the model's ``mtp_num_layers`` / a HybridModel pattern with ``/``): which of the
    shared head's calls per forward the probe measures: 0 the main head (default), k in 1..n MTP depth k (the
    head on depth k's hidden state, with depth k's loss). Needs :meth:`GradientProbe.watch` on the model."""
    general_iterations: int = 32
    """Non-linear heads: conjugate-gradient iterations per step (a fixed count: every TP rank runs the same
    collectives, no host sync). Each is one JVP + one VJP through the head on the ``general_tokens`` tokens;
    the destroyed ratio is an upper bound at any count (``cg_residual``: the largest relative residual), exact
    once it reaches D (in exact arithmetic)."""

    def __post_init__(self):
        for key in ("interval", "update_interval", "rank_interval", "num_buckets"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"probe.{key} must be >= 0 (0 disables), got {getattr(self, key)}")
        if int(self.mtp_depth) < 0:
            raise ConfigError(f"probe.mtp_depth must be >= 0 (0: the main head), got {self.mtp_depth}")
        if self.rank_interval and self.rank_token_budget < 2:
            raise ConfigError(f"probe.rank_token_budget must be >= 2, got {self.rank_token_budget}")
        if not self.slice_memory_mib > 0:
            raise ConfigError(f"probe.slice_memory_mib must be > 0, got {self.slice_memory_mib}")
        for key in ("general_tokens", "general_iterations"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"probe.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class _Plan:
    """What a step measures; decided at its first micro-batch, the same on every rank. ``fused`` and
    ``watch_hidden`` (the head's loss is fused; dL/dH is hooked) are filled by the step's forwards."""

    cheap: bool
    update: bool
    rank: bool
    fused: bool = False
    watch_hidden: bool = False
    sequence_parallel: bool = False
    general: bool = False  # a non-linear head's token sample is measured at the step's close
    logit_scale: float = 1.0  # the fused loss's multiplier of the head's logits (MuP's output multiplier)
    sample_dtype: Optional[torch.dtype] = None  # general path: the head input's dtype (zeros of it where work failed)

    @property
    def any(self) -> bool:
        return self.cheap or self.update or self.rank


@dataclass
class _Shape:
    """k (basis width), d (head input width), r (mix rows; None for a dense head), V_local, padded."""

    k: int
    d: int
    r: Optional[int]
    v_local: int
    padded: bool


@dataclass
class _MicroBatch:
    """One probed micro-batch: what its hooks share."""

    fused: bool
    rows: int  # tokens of the head input on this rank ([s(/tp), b] flattened)
    watch_hidden: bool = False  # a hook on dL/dH (then two hooks fire per micro-batch)
    slice_rows: int = 0  # fused: tokens whose G is recomputed (update / rank)
    gram_rows: int = 0  # tokens entering the rank figures
    view: Optional[HeadView] = None
    hidden: Optional[torch.Tensor] = None
    full_hidden: Optional[torch.Tensor] = None
    record: object = None
    pending: int = 2  # hooks still to fire before the micro-batch counts
    opened: int = 0  # the step it belongs to (GradientProbe._opened when its forward ran)
    capped: Optional[torch.Tensor] = None  # unfused head with a softcap: its output x = c tanh(z / c), detached


@dataclass
class _Closed:
    """A step whose backward is done: its local payload (the cheap/update accumulator's, the fused update
    slice's and the Gram's, of the lengths ``sizes``, known on every rank), waiting for
    :meth:`GradientProbe.end_step`."""

    step: int
    sizes: Tuple[int, int, int]
    payload: Optional[torch.Tensor]
    acc: Optional[StepAccumulator]
    slice_acc: Optional[StepAccumulator]
    gram: Optional[GramAccumulator]
    gram_tokens: int
    sequence_parallel: bool
    general_cheap: bool = False
    general_update: bool = False


def _megatron_num_microbatches() -> int:
    try:
        return int(get_num_microbatches())
    except Exception:  # calculator not initialised: one micro-batch per step
        return 1


def _gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    """All-gather a sequence-sharded [s/tp, b, D] tensor along dim 0 (no autograd)."""
    world = get_pg_size(group)
    if world == 1:
        return hidden.detach()
    h = hidden.detach().contiguous()
    out = torch.empty((h.shape[0] * world,) + tuple(h.shape[1:]), dtype=h.dtype, device=h.device)
    dist.all_gather_into_tensor(out, h, group=group)
    return out


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
        self._shape: Optional[_Shape] = None
        self._seen = 0
        self._plan: Optional[_Plan] = None
        self._failed: Optional[BaseException] = None
        self._acc: Optional[StepAccumulator] = None
        self._slice: Optional[StepAccumulator] = None
        self._gram: Optional[GramAccumulator] = None
        self._closed: Optional[_Closed] = None
        self._was_reporter = False
        self._general = False  # the head is non-linear: the general path (module docstring)
        self._gen_samples: List[Dict] = []
        self._gen_taken = 0
        self._gen_names: List[str] = []
        self._log_prob = None
        self._callbacks: List[Callable[[int, Dict[str, float]], None]] = []
        self._mtp_depths = 0  # MTP depths per model forward (the head is called n + 1 times: depths 1..n, main)
        self._head_call = 0  # index of the head's call within the current model forward
        self._call_measured = True  # the current head call is the one ProbeConfig.mtp_depth names

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
        self._watch_mtp(model, head)
        return self

    def _watch_mtp(self, model, head) -> None:
        """Multi-token prediction: Megatron calls the shared head once per MTP depth 1..n, then for the main loss,
        in every forward (``process_mtp_loss``). A forward pre-hook on the model holding the head restarts the
        count of head calls, so the head's hooks measure only the call of ``config.mtp_depth``."""
        holder = None
        for chunk in (list(model) if isinstance(model, (list, tuple)) else [model]):
            inner = chunk
            while getattr(inner, "output_layer", None) is not head and isinstance(getattr(inner, "module", None),
                                                                                 torch.nn.Module):
                inner = inner.module
            if getattr(inner, "output_layer", None) is head:
                holder = inner
                break
        depths = 0
        if holder is not None and getattr(holder, "mtp_process", False):
            depths = int(getattr(holder.config, "mtp_num_layers", None) or 0)
        if self.config.mtp_depth > depths:
            raise ConfigError(f"probe.mtp_depth={self.config.mtp_depth}, but the model has {depths} multi-token "
                              f"prediction depths on this stage: set probe.mtp_depth between 0 and {depths}.")
        if depths and holder is not None:
            self._mtp_depths = depths
            self._handles.append(holder.register_forward_pre_hook(self._model_forward_starts))

    def _model_forward_starts(self, module, args) -> None:
        self._head_call = 0
        return None

    def _mtp_call_measured(self, module) -> bool:
        """Count this head call (MTP depth i + 1 for call i < n, the main head for call n) and say whether it is the
        depth the probe measures; a call it skips keeps no fused record."""
        i = self._head_call
        self._head_call += 1
        self._call_measured = (i + 1 if i < self._mtp_depths else 0) == self.config.mtp_depth
        if not self._call_measured and is_lm_head(module):
            module.loss_request.record = False
        return self._call_measured

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
            if not callable(getattr(head, "log_prob_fn", None)) or not hasattr(head, "head_input_size"):
                raise HeadConfigError(
                    f"the gradient probe cannot measure the {type(head).__name__} head: it has no probe_view "
                    f"(linear head) and no log_prob_fn / head_input_size (non-linear head; see "
                    f"megatron_bottleneck.base.head.NonLinearHead): implement one, or turn the probe off")
            self._general = True
            if cfg.rank_interval:
                log.warning("GradientProbe: rank figures (probe.rank_interval) are measured for linear heads only; "
                            "the %s head gets the general figures, no rank figures", type(head).__name__)
        self._head = head
        self.tp_group = default_tp_group(self.tp_group or getattr(head, "tp_group", None))
        self.dp_group = default_dp_cp_group(self.dp_group)
        self._handles.append(head.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self._head.register_forward_hook(self._on_forward, with_kwargs=True))
        return self

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict:
        """What the probe carries from one step to the next, for a checkpoint of this rank: the step and the
        rank figures' Gram accumulation when it spans steps (``rank_token_budget`` above one step's tokens).
        It is this rank's own (its TP shard of the vocabulary, its DP rank's tokens): restore it only at the
        layout it was saved from. Call it between steps (after :meth:`end_step`)."""
        g = self._gram
        gram = None if g is None else {
            "token_budget": g.token_budget, "tokens": g.tokens, "vocab_size": g.vocab_size, "eps": g.eps,
            "rows": [r.detach().cpu() for r in g.rows],
            "blocks": [[b.detach().cpu() for b in row] for row in g.blocks]}
        return {"step": self.step, "gram": gram}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`'s state (``{"step": n}`` alone restarts the accumulation at step n: what
        a resume at another layout does; the next ``rank_interval`` step starts a new Gram on every rank)."""
        self.step = int(state.get("step") or 0)
        saved = state.get("gram")
        self._gram = None
        if saved is not None and self.enabled:
            device = self._device()
            g = GramAccumulator(saved["token_budget"])
            g.tokens, g.vocab_size, g.eps = saved["tokens"], saved["vocab_size"], saved["eps"]
            g.rows = [r.to(device) for r in saved["rows"]]
            g.blocks = [[b.to(device) for b in row] for row in saved["blocks"]]
            self._gram = g

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

    def _view(self, head, weight=None) -> HeadView:
        return head_view(head, weight, self.config.vocab_size)

    def _head_shape(self, head, weight) -> _Shape:
        """The head's shapes, from its first forward (a tied head's weight arrives as an argument)."""
        view = self._view(head, weight)
        k, v_local = view.basis.shape[1], view.basis.shape[0]
        d = k if view.mix is None else view.mix.shape[1]
        return _Shape(k=k, d=d, r=None if view.mix is None else view.mix.shape[0], v_local=v_local,
                      padded=view.vocab_size < get_pg_size(self.tp_group) * v_local)

    def _warn_if_vocab_unknown(self, head) -> None:
        """Megatron pads V to a multiple of 128 x TP; without the real size the padded columns would count."""
        if self.config.vocab_size is not None or is_lm_head(head):
            return
        total = self._shape.v_local * get_pg_size(self.tp_group)
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

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _before_forward(self, module, args, kwargs):
        """A head forward in training: open a step if no :meth:`begin_step` did (finishing the previous one if
        nobody did), count the forward (one more than the step's micro-batches is a failure), decide the step's
        plan at its first forward and tell a head implementing the contract whether to keep a record of its
        fused pass."""
        if not self.enabled:  # a switched-off probe leaves the head alone (one enabled probe per head decides)
            return None
        if self._mtp_depths and not self._mtp_call_measured(module):
            return None
        if not (module.training and torch.is_grad_enabled()):
            if is_lm_head(module):
                module.loss_request.record = False
            return None
        if self._shape is None:
            try:
                self._shape = self._general_shape(module) if self._general else \
                    self._head_shape(module, kwargs.get("weight"))
            except Exception as exc:  # the same on every rank: nothing to agree on
                self._disable(exc)
                return None
            self._warn_if_vocab_unknown(module)
        with self._timed():
            if (self._open and self._forwards >= self.num_microbatches) or (not self._open and self._explicit):
                self._mismatch(f"a head forward beyond the step's {self.num_microbatches} micro-batches")
            if not self._open and not self._explicit:
                self._open_step(self._count_for_unbegun_step(), explicit=False)
            if not (self.enabled and self._open):  # switched off, or a forward beyond a begun step's count
                if is_lm_head(module):
                    module.loss_request.record = False
                return None
            self._forwards += 1
            if self._plan is None:
                cfg = self.config
                rank = not self._general and (self._due(cfg.rank_interval)
                                              or (self._gram is not None and not self._gram.full))
                self._plan = _Plan(cheap=self._due(cfg.interval), update=self._due(cfg.update_interval), rank=rank)
                self._gen_samples, self._gen_taken = [], 0
            if is_lm_head(module):
                module.loss_request.record = self._plan.any and not self._general
        return None

    def _on_forward(self, module, args, kwargs, output):
        with self._timed():
            plan = self._plan
            logits = output[0] if isinstance(output, (tuple, list)) else output
            if not (self.enabled and self._open and module.training and torch.is_grad_enabled()):
                return None
            if self._mtp_depths and not self._call_measured:
                return None
            if not (plan is not None and plan.any and isinstance(logits, torch.Tensor) and logits.requires_grad):
                self._count_microbatch()
                return None
            if self._general:
                self._general_forward(module, args, kwargs, logits, plan)
                return None
            hidden = args[0] if args else kwargs["input_"]
            record = getattr(module, "last_loss", None) if is_lm_head(module) else None
            ctx = getattr(module, "loss_context", None)  # an MTP depth's fused output is record.loss as [s, b, 1]
            fused = record is not None and (record.loss is logits or (ctx is not None and ctx.output is logits))
            plan.fused = fused
            if is_lm_head(module):
                module.last_loss = None  # the record lives in this micro-batch's hooks only
            rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
            mb = _MicroBatch(fused=fused, rows=rows, record=record, opened=self._opened)
            shape = self._shape
            if fused and (plan.update or plan.rank):
                mb.slice_rows = min(rows, slice_rows(int(self.config.slice_memory_mib * 2 ** 20), shape.v_local))
            sp = bool(getattr(module, "sequence_parallel", False)) and get_pg_size(self.tp_group) > 1
            plan.sequence_parallel = sp
            if plan.rank:
                if self._gram is None:
                    self._gram = GramAccumulator(self.config.rank_token_budget)
                full_rows = mb.slice_rows if fused else rows * (get_pg_size(self.tp_group) if sp else 1)
                mb.gram_rows = self._gram.take(full_rows)
                self._gram.tokens += mb.gram_rows  # counted here, the same on every rank, whatever fails later
            watch_hidden = (plan.cheap or plan.update) and hidden.requires_grad
            plan.watch_hidden = mb.watch_hidden = watch_hidden
            # Collectives first and unconditionally (every TP rank takes the same branch).
            if plan.update:
                mb.full_hidden = self._gathered(hidden, sp)
            mb.hidden = hidden.detach()
            mb.pending = 1 + int(watch_hidden)
            target = record.loss if fused else logits
            target.register_hook(lambda g: self._on_output_grad(g, mb, sp))
            if watch_hidden:
                hidden.register_hook(lambda dh: self._on_hidden_grad(dh, mb))
            self._try(self._prepare, module, kwargs.get("weight"), mb, plan, sp, watch_hidden)
            if not fused and mb.view is not None and mb.view.softcap is not None:
                # a copy: Megatron's cross-entropy subtracts the row max from its input in place (one logit-sized
                # tensor on a probed unfused step of a capped head, released by the hook)
                mb.capped = logits.detach().clone()
        return None

    def _prepare(self, module, weight, mb: _MicroBatch, plan: _Plan, sp: bool, watch_hidden: bool) -> None:
        mb.view = self._view(module, weight)
        if watch_hidden and self._acc is None:
            self._acc = StepAccumulator(update=plan.update and not mb.fused, sequence_parallel=sp,
                                        num_buckets=self.config.num_buckets, tp_group=self.tp_group)
        if mb.fused and plan.update and watch_hidden and self._slice is None:
            # the slice's token sums live on TP rank 0 (its first rows are rank 0's under SP too): no SP sums
            self._slice = StepAccumulator(update=True, sequence_parallel=False, tp_group=self.tp_group,
                                          padding=False)

    # ------------------------------------------------- the general path (non-linear heads)
    def _general_shape(self, head) -> _Shape:
        lp = head.log_prob_fn()
        self._log_prob = lp  # for a step where building it fails on this rank only (see _general_sums)
        d = int(head.head_input_size)
        return _Shape(k=d, d=d, r=None, v_local=int(lp.n_valid), padded=False)

    def _general_forward(self, module, args, kwargs, output, plan: _Plan) -> None:
        """A micro-batch's forward on a non-linear head: its share of the step's token sample (the head input's
        first rows over the full sequence, all-gathered under SP: a collective every TP rank enters, the count
        following from shapes alone), the labels on the fused path (``loss_context``), and one hook on the
        output (dL/du ``[s, b, V/tp]`` unfused; dL/dloss_t ``[s, b]`` fused)."""
        hidden = args[0] if args else kwargs["input_"]
        ctx = getattr(module, "loss_context", None)
        fused = ctx is not None and ctx.output is output
        tp = get_pg_size(self.tp_group)
        sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
        plan.fused, plan.sequence_parallel, plan.general = fused, sp, True
        plan.logit_scale = float(ctx.logit_scale) if fused else 1.0
        plan.sample_dtype = hidden.dtype
        # from shapes alone, before anything that can fail: the same count on every rank
        rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
        n = max(0, min(rows * (tp if sp else 1), self.config.general_tokens - self._gen_taken))
        self._gen_taken += n
        mb = _MicroBatch(fused=fused, rows=rows, pending=1, opened=self._opened)
        if n:
            full = self._gathered(hidden, sp)  # under SP a collective: entered on every rank
            mb.record = self._try(self._take_sample, full, n, ctx if fused else None)
        output.register_hook(lambda g: self._on_general_grad(g, mb))

    def _gathered(self, hidden: torch.Tensor, sp: bool) -> torch.Tensor:
        """The head input over the full sequence: all-gathered under SP (every TP rank enters the all-gather, with
        zeros of the same shape where its probe work failed this step), else the input itself."""
        if not sp:
            return hidden.detach()
        local = self._try(lambda: hidden.detach().contiguous())
        if local is None:
            local = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        return _gather_sequence(local, self.tp_group)

    def _take_sample(self, full: torch.Tensor, n: int, ctx) -> Dict:
        """This micro-batch's share of the step's token sample (local work): the first ``n`` rows of the head
        input ``[n, D]`` and, fused (``ctx`` the head's loss context), their labels."""
        sample = {"n": n, "hidden": full.reshape(-1, full.shape[-1])[:n].clone()}
        if ctx is not None:
            labels = ctx.labels if ctx.call_labels is None else ctx.call_labels  # an MTP depth's own labels
            sample["labels"] = labels.reshape(-1)[:n].clone()
            sample["spec"] = ctx.config.loss_spec()
        self._gen_samples.append(sample)
        return sample

    def _on_general_grad(self, grad, mb: _MicroBatch) -> None:
        with self._timed():
            if mb.record is not None:
                self._try(self._general_grad, grad, mb)
            self._microbatch_hook_done(mb)

    def _general_grad(self, grad, mb: _MicroBatch) -> None:
        """Keep the sample's rows of the output gradient: dL/dloss_t (fused) or this rank's real columns of
        dL/du (unfused; a gathered output's columns are cut to this rank's shard)."""
        sample, n = mb.record, mb.record["n"]
        if mb.fused:
            sample["scale"] = grad.reshape(-1)[:n].detach().clone()
            return
        g = grad.reshape(-1, grad.shape[-1])[:n]
        head, n_valid = self._head, self._shape.v_local
        per_rank = int(getattr(head, "output_size_per_partition", g.shape[-1]))
        start = 0 if g.shape[-1] <= per_rank else get_pg_rank(self.tp_group) * per_rank
        sample["grad"] = g[:, start:start + n_valid].detach().clone()

    def _general_sums(self, plan: _Plan) -> Optional[torch.Tensor]:
        """:func:`.general.head_sums` of the step's token sample, before any optimizer step: run on every TP rank
        with the same token count and iterations (its JVP / VJP collectives), with zeros on a rank whose
        probe work failed this step. The sums are the same on every TP rank, so only TP rank 0 puts them in the
        payload (zeros elsewhere: the SUM all-reduce of :meth:`end_step` then gives them once)."""
        head, cfg, n = self._head, self.config, self._gen_taken  # (inside the last hook's timing)
        try:
            lp = head.log_prob_fn()
        except Exception as exc:  # the one taken at the first forward: its collectives, values irrelevant now
            self._failed = self._failed or exc
            lp = self._log_prob
        dev = self._device()
        kw = {}

        def inputs():
            samples = self._gen_samples
            h = torch.cat([s["hidden"] for s in samples])
            if plan.fused:
                return h, {"labels": torch.cat([s["labels"] for s in samples]),
                           "scale": torch.cat([s["scale"] for s in samples]),
                           "loss_spec": samples[0]["spec"], "logit_scale": plan.logit_scale}
            return h, {"grad": torch.cat([s["grad"] for s in samples])}

        got = self._try(inputs)
        if got is not None and got[0].shape[0] == n:
            h, kw = got
        else:  # this rank failed: the same call with zeros of the same shapes and kind (its flag is set)
            self._failed = self._failed or RuntimeError("the general probe's token sample is incomplete")
            h = torch.zeros(n, self._shape.d, dtype=plan.sample_dtype, device=dev)
            if plan.fused:  # the healthy ranks' labels branch, its collectives included (MuP's normaliser), G = 0
                kw = {"labels": torch.zeros(n, dtype=torch.long, device=dev),
                      "scale": torch.zeros(n, dtype=torch.float64, device=dev), "logit_scale": plan.logit_scale}
            else:
                kw = {"grad": torch.zeros(n, self._shape.v_local, dtype=torch.float64, device=dev)}
        errors: List[BaseException] = []  # a failure of local work inside: the collectives go on with zeros
        try:
            sums = head_sums(lp, h, iterations=cfg.general_iterations if plan.cheap else 0, update=plan.update,
                             errors=errors, **kw)
        except Exception as exc:
            self._failed = self._failed or exc
            return None
        if errors:
            self._failed = self._failed or errors[0]
            return None
        return sums * (1.0 if get_pg_rank(self.tp_group) == 0 else 0.0)

    def _on_output_grad(self, grad, mb: _MicroBatch, sp: bool) -> None:
        """dL/dlogits (unfused: G's vocab shard [s, b, V/tp], taken through a softcapped head's cap to its linear
        logits, where the fused path takes it) or dL/dloss_t (fused: [s, b])."""
        with self._timed():
            if mb.fused:
                self._try(self._fused_output_grad, grad, mb)
            else:
                if mb.capped is not None:  # G at the linear logits z, through the cap (as the fused path's)
                    grad = grad.float() * softcap_slope(mb.capped.float(), mb.view.softcap)
                    mb.capped = None
                e = self._try(self._unfused_output_grad, grad, mb)
                if self._shape.padded and mb.watch_hidden:
                    # padding correction: every TP rank enters this one collective, zeros if it failed
                    if e is None:
                        e = torch.zeros(grad.reshape(-1, grad.shape[-1]).shape[0], self._shape.k,
                                        dtype=torch.float32, device=grad.device)
                    e = StepAccumulator.reduce_padding(e, self.tp_group, sp)
                    self._try(lambda: self._acc.push_padding(e))
                if mb.gram_rows and self._gram is not None:
                    self._try(self._gram.add, grad, mb.view, mb.gram_rows)
            self._microbatch_hook_done(mb)

    def _unfused_output_grad(self, grad, mb: _MicroBatch):
        acc = self._acc
        if acc is None:
            return None
        acc.add_logit_grad(grad, mb.view, mb.full_hidden if acc.update else None, padding=False)
        return acc.padding_local(grad, mb.view) if self._shape.padded else None

    def _fused_output_grad(self, grad_out, mb: _MicroBatch) -> None:
        rec = mb.record
        # G is the gradient at the head's own logits z (what the unfused probe hooks), and the fused pass ran
        # on c z (MuP's output multiplier c = logit_scale, folded into its input): dL/dz = c dL/d(cz), i.e.
        # dL/dloss_t scaled by c in both the norms (c^2 ||.||^2) and the update slice's rows, as dL/dH carries c
        grad_out = grad_out * rec.logit_scale if rec.logit_scale != 1.0 else grad_out
        if self._acc is not None:
            self._acc.add_logit_sq_norms(rec.stats.logit_grad_sq_norm(grad_out), mb.view)
        n = mb.slice_rows
        if not n or (self._slice is None and not mb.gram_rows):
            return
        st = rec.stats
        g = logit_grad_rows(rec.input.reshape(-1, rec.input.shape[-1])[:n], rec.weight, rec.labels.reshape(-1)[:n],
                            st.lse.reshape(-1)[:n], grad_out.reshape(-1)[:n], vocab_start=rec.vocab_start,
                            vocab_size=rec.vocab_size, loss_spec=st.loss_spec(), bias=rec.bias)
        if self._slice is not None:
            self._slice.add_logit_grad(g, mb.view, mb.full_hidden.reshape(-1, mb.full_hidden.shape[-1])[:n],
                                       padding=False)
        if mb.gram_rows and self._gram is not None:
            self._gram.add(g, mb.view, mb.gram_rows)

    def _on_hidden_grad(self, hidden_grad, mb: _MicroBatch) -> None:
        with self._timed():
            self._try(self._hidden_grad, hidden_grad, mb)
            self._microbatch_hook_done(mb)

    def _hidden_grad(self, hidden_grad, mb: _MicroBatch) -> None:
        if self._acc is not None:
            self._acc.add_hidden_grad(hidden_grad, mb.hidden if self._acc.update else None)
        if self._slice is not None and mb.slice_rows:
            n = mb.slice_rows
            d = hidden_grad.shape[-1]
            self._slice.add_hidden_grad(hidden_grad.reshape(-1, d)[:n], mb.hidden.reshape(-1, d)[:n])

    def _microbatch_hook_done(self, mb: _MicroBatch) -> None:
        mb.pending -= 1
        if mb.pending == 0:
            self._count_microbatch(mb)

    def _count_microbatch(self, mb: Optional[_MicroBatch] = None) -> None:
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

    def _count_for_unbegun_step(self) -> int:
        n = self._default_microbatches
        return _megatron_num_microbatches() if n is None else n

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
        gram_full = self._gram is not None and self._gram.full
        if plan is not None and (force or plan.watch_hidden or gram_full or plan.general):
            self._close(plan)
        elif force:
            self._flag_only_step()
        self.step += 1

    def _flag_only_step(self) -> None:
        """A closed step carrying nothing but the failure flag (a mismatch where the step measured nothing)."""
        if self._closed is None:
            self._closed = _Closed(step=self.step, sizes=(0, 0, 0, 0), payload=None, acc=None, slice_acc=None,
                                   gram=None, gram_tokens=0, sequence_parallel=False)

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
    def _sizes(self, plan: _Plan, gram_tokens: int) -> Tuple[int, int, int, int]:
        """Lengths of the step's payload parts, from shapes and the plan alone (a failed rank knows them too)."""
        s, nb = self._shape, self.config.num_buckets
        acc = slice_ = 0
        if plan.watch_hidden:
            acc = StepAccumulator.payload_size(s.k, s.d, s.r, nb, plan.update and not plan.fused)
            if plan.fused and plan.update:
                slice_ = StepAccumulator.payload_size(s.k, s.d, s.r, 0, True)
        return acc, slice_, gram_tokens * gram_tokens, len(SUM_NAMES) if plan.general else 0

    def _close(self, plan: _Plan) -> None:
        """The step's backward is done: build the local payload (device work, before any optimizer step changes
        the weights) for :meth:`end_step`."""
        gram = self._gram if (self._gram is not None and self._gram.full) else None
        gram_tokens = gram.tokens if gram is not None else 0
        general = self._general_sums(plan) if plan.general else None  # collectives: on every rank, first
        payload = self._try(self._local_payload, plan, gram, general)
        self._closed = _Closed(step=self.step, sizes=self._sizes(plan, gram_tokens), payload=payload,
                               acc=self._acc, slice_acc=self._slice, gram=gram, gram_tokens=gram_tokens,
                               sequence_parallel=plan.sequence_parallel, general_cheap=plan.cheap,
                               general_update=plan.update)
        self._acc = self._slice = None
        self._gen_samples, self._gen_taken = [], 0
        if gram is not None:
            self._gram = None

    def _local_payload(self, plan: _Plan, gram: Optional[GramAccumulator],
                       general: Optional[torch.Tensor] = None) -> torch.Tensor:
        if plan.general and general is None:
            raise RuntimeError("the general probe's sums are missing")
        parts = []
        parts.append(self._acc.local_payload() if (plan.cheap or plan.update) and self._acc is not None
                     else torch.zeros(0, dtype=torch.float64))
        parts.append(self._slice.local_payload() if self._slice is not None else torch.zeros(0, dtype=torch.float64))
        parts.append(gram.local_payload() if gram is not None else torch.zeros(0, dtype=torch.float64))
        parts.append(general if general is not None else torch.zeros(0, dtype=torch.float64))
        device = next((p.device for p in parts if p.numel()), torch.device("cpu"))
        return torch.cat([p.to(device) for p in parts])

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
            device = self._device()
            failed = closed.payload is None or self._failed is not None
            total = 1 + sum(closed.sizes)  # the failure flag first
            if failed:
                flat = torch.zeros(total, dtype=torch.float64, device=device)
                flat[0] = 1.0
            else:
                flat = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), closed.payload.to(device)])
                if flat.numel() != total:  # a layout bug: treated as a failure, never as a size mismatch
                    self._failed = RuntimeError(f"probe payload has {flat.numel()} values, expected {total}")
                    flat = torch.zeros(total, dtype=torch.float64, device=device)
                    flat[0] = 1.0
            if get_pg_size(self.tp_group) > 1:
                dist.all_reduce(flat, group=self.tp_group)
            figures = None if failed else self._try(self._device_figures, closed, flat)
            if figures is None:
                self._matching_collectives(closed)
                names, values = [], flat[:1]
            else:
                names, values = figures
            if get_pg_size(self.tp_group) > 1:
                # a failure after the reduction (the figures) on one rank: every rank of the group learns of it
                late = torch.full((1,), 1.0 if figures is None and not failed else 0.0, dtype=torch.float64,
                                  device=device)
                dist.all_reduce(late, group=self.tp_group)
                values = torch.cat([values[:1] + late.to(values.device), values[1:]])
            host = values.cpu()  # the probe's one host synchronisation of the step
            if float(host[0]) > 0 or self._failed is not None:
                self._disable(self._failed or RuntimeError("the probe failed on another tensor-parallel rank"))
                return None
            try:
                out = self._host_figures(closed, names, host)
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

    def _matching_collectives(self, closed: _Closed) -> None:
        """The collectives a healthy rank runs inside :meth:`_device_figures` (per-bucket sums under SP)."""
        if closed.acc is not None and closed.acc.buckets_reduced:
            return
        if self.config.num_buckets and closed.sequence_parallel and get_pg_size(self.tp_group) > 1 \
                and closed.sizes[0]:
            dist.all_reduce(torch.zeros(self.config.num_buckets, dtype=torch.float64, device=self._device()),
                            group=self.tp_group)

    def _device_figures(self, closed: _Closed, flat: torch.Tensor):
        """(names, one flat tensor): the flag, the scalar figures, then the Gram's eigenvalues (device work)."""
        take_at = [1]

        def part(n):
            out = flat[take_at[0]: take_at[0] + n]
            take_at[0] += n
            return out

        names, scalars = ["_flag"], [flat[0]]
        p_acc, p_slice, p_gram, p_gen = (part(n) for n in closed.sizes)
        self._acc_names = []
        if closed.sizes[0]:
            fig = closed.acc.figures(p_acc)
            self._acc_names = list(fig)
            names += self._acc_names
            scalars += [fig[n] for n in self._acc_names]
        if closed.sizes[1]:
            fig = closed.slice_acc.figures(p_slice)
            names += ["update_cosine", "_slice_finite"]
            scalars += [fig["update_cosine"], fig["_finite"]]
        self._gen_names = []
        if closed.sizes[3]:
            fig = figures_from_sums(p_gen, update=closed.general_update)
            keep = ["grad_norm"] + (["destroyed_ratio", "visible_cosine", "cg_residual"] if closed.general_cheap
                                    else []) + (["update_cosine"] if closed.general_update else [])
            fig["probe_tokens"] = p_gen[SUM_NAMES.index("tokens")]
            self._gen_names = keep + ["probe_tokens"]
            names += self._gen_names
            scalars += [fig[n] for n in self._gen_names]
        vec = torch.stack([t.reshape(()).double() for t in scalars])
        if closed.sizes[2]:
            names.append("_gram_finite")
            vec = torch.cat([vec, torch.isfinite(p_gram).all().double().reshape(1),
                             closed.gram.eigenvalues(p_gram, closed.gram_tokens)])
        return names, vec

    def _host_figures(self, closed: _Closed, names: List[str], host: torch.Tensor) -> Dict:
        n = len(names)
        values = dict(zip(names, host[:n].tolist()))
        out: Dict = {}
        if closed.sizes[0]:
            out.update(closed.acc.host_figures({k: values[k] for k in self._acc_names}))
        if closed.sizes[1]:
            ok = values["_slice_finite"] >= 1.0
            out["update_cosine"] = values["update_cosine"] if ok else float("nan")
            out["update_tokens"] = float(closed.slice_acc.tokens if closed.slice_acc is not None else 0)
        if closed.sizes[3]:
            out.update({k: values[k] for k in self._gen_names})
        if closed.sizes[2]:
            kw = {"rtol": self.config.rank_rtol, "energy_ks": tuple(self.config.energy_ks),
                  "residual_ranks": (2 * self._shape.d,)}
            out.update(closed.gram.host_figures(host[n:], closed.gram_tokens, values["_gram_finite"] >= 1.0, **kw))
        return out

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
        self._acc = self._slice = self._gram = None
        self._gen_samples, self._gen_taken = [], 0
        self._failed = None
        self._open = self._explicit = False
        self._plan = None
