"""``GradientProbe``: measure the LM-head gradient bottleneck on the real training step.

How it works. ``watch(model)`` puts a forward hook on the head (``output_layer``) of the model chunk
that holds it (last pipeline stage; elsewhere the probe stays idle). On a step due for measurement
the hook registers a tensor hook on the logits, so the backward pass hands over the logit gradient
G of that micro-batch (its vocab shard) together with the head input H and the head's
:class:`~megatron_bottleneck.base.head.HeadView`. The math (:mod:`.stats`, :mod:`.spectrum`) does
only local work per micro-batch; when the micro-batch that completes the step has gone through
backward, the few small all-reduces over the TP group run and one record per step is logged. There
is no second backward and nothing is written into gradients or RNG state (the hooks return None).

Intervals (0 = off): ``interval`` for the cheap figures (norms, destroyed ratio, visible cosine,
isotropic baseline); ``update_interval`` for cos(-G, dZ), which costs one extra T x D x V/tp
product; ``rank_interval`` for the Gram-based rank figures, accumulated over micro-batches and steps
until ``rank_token_budget`` tokens.

Reporting: the probe runs on every rank holding the head; the figures describe the micro-batches of
data-parallel rank 0 and are logged by its TP rank 0 (``is_reporter``). Failures inside the probe
(any exception) are logged as a warning and switch the probe off: training never stops for it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.errors import ConfigError
from ..base.groups import default_dp_group, default_tp_group
from ..base.head import HeadView, find_head
from ..base.sinks import MetricsLogger
from .spectrum import GramAccumulator
from .stats import StepAccumulator

log = logging.getLogger(__name__)


def _hook(fn):
    """A probe hook: any exception switches the probe off (training never stops for it) and the hook returns
    None; its time is counted in ``seconds`` when ``time_hooks`` is on (synchronising CUDA)."""

    def guarded(self, *args):
        try:
            fn(self, *args)
        except Exception as exc:  # never break training
            self._disable(exc)

    def hook(self, *args):
        if not self.time_hooks:
            return guarded(self, *args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return guarded(self, *args)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0

    return hook


def _width(view: HeadView) -> int:
    """D, the head's input width, from its view (the basis's width for a dense head, the mix's otherwise)."""
    return view.basis.shape[-1] if view.mix is None else view.mix.shape[-1]


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
    ``real_vocab_size`` if it has one, else its full (padded) size, with a warning when that is padded."""
    log_dir: Optional[str] = None
    """Where ``probe.jsonl`` (and ``tensorboard/``) go; None: keep figures in ``history`` only."""
    tensorboard: bool = True
    """Also write TensorBoard events (skipped with one warning when tensorboard is not installed)."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project (skipped with one warning when wandb is not installed)."""

    def __post_init__(self):
        for key in ("interval", "update_interval", "rank_interval", "num_buckets"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"probe.{key} must be >= 0 (0 disables), got {getattr(self, key)}")
        if self.rank_interval and self.rank_token_budget < 2:
            raise ConfigError(f"probe.rank_token_budget must be >= 2, got {self.rank_token_budget}")


def head_view(head, weight: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> HeadView:
    """The probe's view of a head module: a basis F of col(W) (vocab shard) and W = F M.

    Heads may define ``probe_view(weight, vocab_size) -> HeadView`` (the low-rank head does);
    otherwise a dense head with ``weight`` of shape (V/tp, D) is assumed (Megatron's
    ``ColumnParallelLinear``, ``torch.nn.Linear``). ``weight`` is the one passed to forward, if any
    (tied embeddings). ``vocab_size``: the real vocabulary (None: the head's ``real_vocab_size`` if set).
    """
    if vocab_size is None:
        vocab_size = getattr(head, "real_vocab_size", None)
    if hasattr(head, "probe_view"):
        return head.probe_view(weight=weight, vocab_size=vocab_size)
    w = head.weight if weight is None else weight
    rows = w.shape[0]
    group = getattr(head, "tp_group", None)
    total = getattr(head, "output_size", rows * get_pg_size(group))
    return HeadView(basis=w.detach(), mix=None, vocab_start=get_pg_rank(group) * rows,
                    vocab_size=vocab_size if vocab_size is not None else total)


class GradientProbe:
    """Measures how much of the logit gradient survives the LM head, during training."""

    def __init__(self, config: Optional[ProbeConfig] = None, tp_group=None, dp_group=None,
                 logger=None, **overrides):
        self.config = config or ProbeConfig(**overrides)
        self.tp_group = tp_group
        self.dp_group = dp_group
        self.step = 0
        self.num_microbatches = 1
        self.enabled = True
        self.time_hooks = False  # benchmarking: accumulate the time spent in the probe in `seconds`
        self.seconds = 0.0
        self.history: List[Dict[str, float]] = []
        self._logger = logger
        self._handles = []
        self._head = None
        self._seen = 0
        self._step_acc: Optional[StepAccumulator] = None
        self._gram: Optional[GramAccumulator] = None
        self._callbacks: List[Callable[[int, Dict[str, float]], None]] = []

    # ------------------------------------------------------------------ setup
    def watch(self, model, num_microbatches: Optional[int] = None) -> "GradientProbe":
        """Attach to the head of ``model`` (a module or list of chunks); idempotent.

        ``num_microbatches`` per optimizer step; default: Megatron's num-microbatches calculator if
        initialised, else 1.
        """
        if num_microbatches is None:
            num_microbatches = _megatron_num_microbatches()
        self.num_microbatches = int(num_microbatches)
        if self._head is not None:
            return self
        head = find_head(model)
        if head is None:
            return self  # not the last pipeline stage: idle
        return self.watch_head(head, self.num_microbatches)

    def watch_head(self, head: torch.nn.Module, num_microbatches: int = 1) -> "GradientProbe":
        """Attach to a head module directly (any module whose logits are linear in its weight)."""
        self.num_microbatches = int(num_microbatches)
        if self._head is not None:
            return self
        self._head = head
        self.tp_group = default_tp_group(self.tp_group or getattr(head, "tp_group", None))
        self.dp_group = default_dp_group(self.dp_group)
        self._warn_if_vocab_unknown(head)
        self._handles.append(head.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self._head.register_forward_hook(self._on_forward, with_kwargs=True))
        return self

    def on_record(self, fn: Callable[[int, Dict[str, float]], None]) -> None:
        """Also call ``fn(step, figures)`` for every finalised step, on every rank that probes (the
        Megatron-LM integration writes to Megatron-LM's own TensorBoard / W&B writers this way, on the
        rank that owns them)."""
        self._callbacks.append(fn)

    def remove(self) -> None:
        """Detach from the head and close the logs (``is_reporter`` keeps its last value)."""
        self._was_reporter = self.is_reporter
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._head is not None:
            self._head.collect_loss_stats = self._head.materialize_logits = False
        self._head = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    def _warn_if_vocab_unknown(self, head) -> None:
        """Megatron pads V to a multiple of 128 x TP; without the real size the padded columns would count."""
        if self.config.vocab_size is not None or getattr(head, "real_vocab_size", None) is not None:
            return
        view = head_view(head)
        total = view.basis.shape[0] * get_pg_size(self.tp_group)
        if total % 128 == 0:
            log.warning("GradientProbe: the real vocabulary size is unknown, so its figures count all %d columns "
                        "of the head, which may include Megatron's padding (and then differ across TP sizes). "
                        "Pass ProbeConfig(vocab_size=<tokenizer vocab size>).", total)

    @property
    def is_reporter(self) -> bool:
        if self._head is None:
            return getattr(self, "_was_reporter", False)
        return get_pg_rank(self.tp_group) == 0 and get_pg_rank(self.dp_group) == 0

    # ------------------------------------------------------------- schedule
    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    @_hook
    def _on_forward(self, module, args, kwargs, output):
        if not (self.enabled and module.training and torch.is_grad_enabled()):
            return None
        cfg = self.config
        cheap, update = self._due(cfg.interval), self._due(cfg.update_interval)
        rank = self._due(cfg.rank_interval) or (self._gram is not None and not self._gram.full)
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if not (cheap or update or rank) or not logits.requires_grad:
            self._count_microbatch(None)
            return None
        stats = getattr(module, "last_loss_stats", None)
        fused = stats is not None and getattr(module, "last_fused_loss", None) is logits  # per-token loss, no G
        if fused:  # G itself is not there: only the cheap figures this time
            update, rank = False, False
            if not cheap:
                self._count_microbatch(None)
                return None
        hidden = args[0] if args else kwargs["input_"]
        view = head_view(module, kwargs.get("weight"), cfg.vocab_size)
        sp = bool(getattr(module, "sequence_parallel", False))
        full = _gather_sequence(hidden, self.tp_group) if (update and sp) else hidden.detach()
        if (cheap or update) and self._step_acc is None:
            self._step_acc = StepAccumulator(update=update, sequence_parallel=sp,
                                             num_buckets=cfg.num_buckets, tp_group=self.tp_group)
        if rank and self._gram is None:
            self._gram = GramAccumulator(cfg.rank_token_budget)
        acc = self._step_acc if (cheap or update) else None
        gram = self._gram if rank else None
        watch_hidden = acc is not None and hidden.requires_grad
        if fused:  # ||G||^2 per token from the fused pass's statistics and dL/dloss_t; dH as always
            logits.register_hook(lambda g: self._on_loss_grad(g, stats, view, acc, not watch_hidden))
        else:
            logits.register_hook(lambda g: self._on_logit_grad(g, view, full, acc, gram, not watch_hidden))
        if watch_hidden:
            h = hidden.detach()
            hidden.register_hook(lambda dh: self._on_hidden_grad(dh, h, acc))

    @_hook
    def _on_loss_grad(self, grad_out, stats, view, acc, last):
        if acc is not None:
            acc.add_logit_sq_norms(stats.logit_grad_sq_norm(grad_out), view)
        if last:
            self._count_microbatch(_width(view))

    @_hook
    def _before_forward(self, module, args, kwargs):
        """A fused head + loss gives the probe ||G||^2 (from statistics it keeps when asked, on steps with
        cheap figures) but not G: on steps that need G itself (update or rank figures) ask the head to build
        the logits."""
        if not self.enabled:  # a switched-off probe leaves the head alone (one enabled probe per head decides)
            return None
        cfg = self.config
        module.materialize_logits = bool(self._due(cfg.update_interval) or self._due(cfg.rank_interval) or (
            self._gram is not None and not self._gram.full))
        module.collect_loss_stats = self._due(cfg.interval)  # the fused pass's statistics, only when used

    @_hook
    def _on_logit_grad(self, grad, view, full_hidden, acc, gram, last):
        if acc is not None:
            acc.add_logit_grad(grad, view, full_hidden if acc.update else None)
        if gram is not None:
            gram.add(grad, view)
        if last:
            self._count_microbatch(_width(view))

    @_hook
    def _on_hidden_grad(self, hidden_grad, hidden, acc):
        acc.add_hidden_grad(hidden_grad, hidden if acc.update else None)
        self._count_microbatch(hidden.shape[-1])

    def _count_microbatch(self, hidden_size: Optional[int]) -> None:
        self._seen += 1
        if self._seen < self.num_microbatches:
            return
        self._seen = 0
        figures: Dict[str, float] = {}
        if self._step_acc is not None:
            figures.update(self._step_acc.finalize(self.tp_group))
            self._step_acc = None
        if self._gram is not None and self._gram.full:
            kw = {"rtol": self.config.rank_rtol, "energy_ks": tuple(self.config.energy_ks)}
            if hidden_size:
                kw["residual_ranks"] = (2 * hidden_size,)
            figures.update(self._gram.finalize(self.tp_group, **kw))
            self._gram = None
        if figures:
            self._record(figures)
        self.step += 1

    def _record(self, figures: Dict[str, float]) -> None:
        self.history.append({"step": self.step, **figures})
        for fn in self._callbacks:
            fn(self.step, figures)
        if self.is_reporter:
            if self._logger is None and self.config.log_dir:
                self._logger = MetricsLogger(self.config.log_dir, "probe.jsonl", self.config.tensorboard,
                                             self.config.wandb_project)
            if self._logger is not None:
                self._logger.log(self.step, figures, prefix="probe/")

    def _disable(self, exc: BaseException) -> None:
        log.warning("GradientProbe switched off after an error (training continues): %r", exc)
        self.enabled = False
        if self._head is not None:  # the head goes back to its fused path without statistics
            self._head.collect_loss_stats = self._head.materialize_logits = False
        self._step_acc = None
        self._gram = None


def _megatron_num_microbatches() -> int:
    try:
        return int(get_num_microbatches())
    except Exception:  # calculator not initialised: one micro-batch per step
        return 1


def _gather_sequence(hidden: torch.Tensor, group) -> torch.Tensor:
    """All-gather a sequence-sharded [s/tp, b, D] tensor along dim 0 (no autograd)."""
    world = get_pg_size(group)
    if world == 1:
        return hidden
    h = hidden.detach().contiguous()
    out = torch.empty((h.shape[0] * world,) + tuple(h.shape[1:]), dtype=h.dtype, device=h.device)
    dist.all_gather_into_tensor(out, h, group=group)
    return out
