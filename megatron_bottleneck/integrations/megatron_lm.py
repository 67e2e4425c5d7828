"""Megatron-LM entry point: low-rank LM head and gradient probe from command-line arguments.

Three ways to use it, from least to most explicit:

* zero edit: ``python -m megatron_bottleneck.megatron_lm pretrain_gpt.py <Megatron args> --lm-head-rank 64``
  (or under ``torchrun``) runs the unchanged script after :func:`patch`; ``pretrain_hybrid.py`` (Megatron-LM
  core_v0.19, megatron-core >= 0.19: HybridModel) the same way;
* one line at the top of ``pretrain_gpt.py`` (before ``from megatron.training import pretrain``)::

      import megatron_bottleneck.megatron_lm as mbl; mbl.patch()

* explicit wrapping in the ``pretrain(...)`` call (Megatron-LM core_v0.16-style, whose ``pretrain``
  takes a model provider): ``mbl.wrap_model_provider(...)``, ``mbl.wrap_forward_step(forward_step)``,
  ``extra_args_provider=mbl.add_arguments``.

:func:`patch` wraps ``megatron.training.pretrain`` so that its model provider installs the head
(core_v0.16) or a pre-wrap hook is added to the config container's model (core_v0.19, whose
``pretrain`` builds the model from ``cfg_container.model``), its ``forward_step`` attaches the probe,
and the arguments below are parsed (``extra_args_provider`` of ``pretrain`` for core_v0.16,
``megatron.training.arguments.parse_and_validate_args`` for core_v0.19). Without CUDA it also
enables the CPU mode and :mod:`.megatron_training_cpu`'s patches, and gives a ``pretrain_hybrid.py`` run without
``--spec`` megatron-bottleneck's local hybrid stack spec (Megatron's default needs Transformer Engine; one line says
so): the spec ``--spec megatron_bottleneck.models.hybrid LOCAL_HYBRID_STACK_SPEC`` selects on any device.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import inspect
import math
import os
import runpy
import sys
import time
from importlib.metadata import version
from typing import Callable, List, Optional, Set

import torch
from megatron.core import parallel_state as ps
from megatron.core.num_microbatches_calculator import get_num_microbatches

from ..base.errors import ConfigError, HeadConfigError
from ..base.head import HeadConfig, parse_head_options
from ..base.quiet import quiet_megatron_warnings
from ..heads.model_loss import FusedLossConfig, enable_fused_loss
from ..heads import registered_heads
from ..heads.install import LowRankHeadConfig, install_head, install_low_rank_head, refuse_from_dense_before_load
from ..heads.low_rank import INIT_METHODS, LowRankOutputLayer
from ..models.hybrid import LOCAL_HYBRID_STACK_SPEC, require_hybrid_model
from ..probe.probe import GradientProbe, ProbeConfig
from .checkpoint_writer import start_writer_helpers
from .cpu import enable_cpu_mode
from .forward_step import wrap_forward_step as _wrap_forward_step
from .launch import free_port

__all__ = [
    "add_arguments",
    "check_arguments",
    "check_hybrid_arguments",
    "LOCAL_HYBRID_SPEC",
    "extra_args_provider",
    "wrap_model_provider",
    "wrap_forward_step",
    "install_head_from_args",
    "get_probe",
    "MegatronLMIntegration",
    "integration_of",
    "patched_integration",
    "real_vocab_size",
    "patch",
    "main",
]

PREFIX = "megatron-bottleneck:"
_WRAPPED = "__megatron_bottleneck_wrapped__"
LOCAL_HYBRID_SPEC = ("megatron_bottleneck.models.hybrid", "LOCAL_HYBRID_STACK_SPEC")
"""``--spec`` of megatron-bottleneck's local (non-TE) hybrid stack spec for ``pretrain_hybrid.py``."""
MEGATRON_HYBRID_SPECS = (("megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"),
                         ("megatron.core.models.hybrid.hybrid_layer_specs", "mamba_stack_spec"))
"""``--spec`` of Megatron's own (Transformer Engine) hybrid stack spec."""
HYBRID_SCRIPT = "pretrain_hybrid.py"


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _print0(msg: str) -> None:
    if _rank() == 0:
        print(f"{PREFIX} {msg}", flush=True)


# --------------------------------------------------------------------------------- arguments
def add_arguments(parser):
    """Megatron-LM ``extra_args_provider``: adds the group "megatron-bottleneck" (idempotent)."""
    if any(getattr(a, "dest", None) == "lm_head_rank" for a in parser._actions):
        return parser

    g = parser.add_argument_group(title="megatron-bottleneck")
    g.add_argument("--lm-head-rank", type=int, default=None,
                   help="Replace the LM head by a rank-r factorised head W = A B (needs "
                        "--untie-embeddings-and-output-weights). Default: keep the dense head.")
    g.add_argument("--lm-head-init", choices=INIT_METHODS, default="balanced",
                   help="Initialisation of the low-rank head (from_dense is refused: the provider runs before "
                        "--load, on random weights).")
    g.add_argument("--lm-head-type", type=str, default=None,
                   help="The LM head kind (a registered one: " + ", ".join(registered_heads()) + "; needs "
                        "--untie-embeddings-and-output-weights unless dense). Default: low_rank with "
                        "--lm-head-rank, else dense.")
    g.add_argument("--lm-head-options", type=str, default="",
                   help="The head kind's options as name=value,name=value, e.g. k=4 for mos.")
    g.add_argument("--lm-head-fused-loss", action="store_true",
                   help="Compute the loss fused with the LM head (dense or low-rank): no [s, b, V/tp] logits.")
    g.add_argument("--lm-head-softcap", type=float, default=None,
                   help="Fused loss: final-logit softcapping c, logits -> c tanh(z / c) (Gemma) inside the loss "
                        "(logits returned without labels stay uncapped); needs --lm-head-fused-loss.")
    g.add_argument("--lm-head-z-loss-weight", type=float, default=0.0,
                   help="Fused loss: z-loss weight w, adds w lse^2 per token; needs --lm-head-fused-loss.")
    g.add_argument("--lm-head-label-smoothing", type=float, default=0.0,
                   help="Fused loss: label smoothing alpha in [0, 1) (Megatron-LM's cross-entropy has none); needs "
                        "--lm-head-fused-loss.")
    g.add_argument("--lm-head-smoothing-convention", choices=("megatron", "torch"), default="megatron",
                   help="megatron: eps = alpha V / (V - 1), 1 - alpha on the label (Megatron-Core's); torch: eps = "
                        "alpha (torch's, Liger-Kernel's).")
    g.add_argument("--lm-head-class-weights", type=str, default=None,
                   help="Fused loss: a file of V class weights >= 0 (whitespace-separated numbers, or a 1-D tensor "
                        "saved by torch.save as .pt): the per-token loss carries w_y; needs --lm-head-fused-loss.")
    g.add_argument("--probe-interval", type=int, default=0,
                   help="Gradient-probe cheap figures every N steps (0: probe off).")
    g.add_argument("--probe-update-interval", type=int, default=0,
                   help="Probe cos(-G, dZ) every N steps (0: off).")
    g.add_argument("--probe-rank-interval", type=int, default=0,
                   help="Probe rank figures every N steps (0: off).")
    g.add_argument("--probe-rank-token-budget", type=int, default=2048,
                   help="Tokens accumulated for the probe's rank figures.")
    g.add_argument("--probe-general-tokens", type=int, default=256,
                   help="Non-linear heads (mos, sigsoftmax, ...): tokens per probed step measured by the general "
                        "probe (conjugate gradients through the head).")
    g.add_argument("--probe-general-iterations", type=int, default=32,
                   help="Non-linear heads: CG iterations per probed step (the destroyed ratio is an upper bound "
                        "at any count; cg_residual says how far from converged).")
    g.add_argument("--probe-log-dir", type=str, default=None,
                   help="Directory for probe.jsonl (and TensorBoard when Megatron-LM has no "
                        "--tensorboard-dir). Default: no JSONL.")
    return parser


def _option_parser():
    """Our options and the Megatron-LM ones they depend on, parsed leniently (no usage dump, no exit)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--lm-head-rank", type=str, default=None)
    p.add_argument("--lm-head-init", type=str, default="balanced")
    p.add_argument("--lm-head-type", type=str, default=None)
    p.add_argument("--lm-head-options", type=str, default="")
    p.add_argument("--lm-head-fused-loss", action="store_true")
    p.add_argument("--lm-head-softcap", type=str, default=None)
    p.add_argument("--lm-head-z-loss-weight", type=str, default=None)
    p.add_argument("--lm-head-label-smoothing", type=str, default=None)
    p.add_argument("--lm-head-smoothing-convention", type=str, default=None)
    p.add_argument("--lm-head-class-weights", type=str, default=None)
    for name, default in (("--probe-interval", "0"), ("--probe-update-interval", "0"),
                          ("--probe-rank-interval", "0"), ("--probe-rank-token-budget", "2048"),
                          ("--probe-general-tokens", "256"), ("--probe-general-iterations", "32")):
        p.add_argument(name, type=str, default=default)
    p.add_argument("--probe-log-dir", type=str, default=None)
    p.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    p.add_argument("--hybrid-layer-pattern", type=str, default=None)
    p.add_argument("--spec", type=str, nargs="*", default=None)
    p.add_argument("--cross-entropy-loss-fusion", action="store_true")
    p.add_argument("--save", type=str, default=None)
    p.add_argument("--ckpt-format", type=str, default="torch_dist")
    for name in ("--hidden-size", "--train-iters", "--global-batch-size", "--seq-length",
                 "--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        p.add_argument(name, type=str, default=None)
    return p


def _int(args, name: str, minimum: Optional[int] = None) -> Optional[int]:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise HeadConfigError(f"{name} takes an integer, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise HeadConfigError(f"{name} must be >= {minimum}, got {n}")
    return n


def _fused_loss_config(args) -> FusedLossConfig:
    """The fused loss's options from ``--lm-head-softcap`` / ``--lm-head-z-loss-weight`` /
    ``--lm-head-label-smoothing`` / ``--lm-head-smoothing-convention`` / ``--lm-head-class-weights`` (one-line
    HeadConfigError for a bad value, or for any of them without ``--lm-head-fused-loss``)."""
    values = {}
    fused = getattr(args, "lm_head_fused_loss", False)

    def needs_fused(flag):
        if not fused:
            raise HeadConfigError(f"{flag} is an option of the fused head loss: add --lm-head-fused-loss")

    for flag, key, low, bound in (("--lm-head-softcap", "softcap", "> 0", lambda v: v > 0),
                                  ("--lm-head-z-loss-weight", "z_loss_weight", ">= 0", lambda v: v >= 0),
                                  ("--lm-head-label-smoothing", "label_smoothing", "in [0, 1)",
                                   lambda v: 0 <= v < 1)):
        raw = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise HeadConfigError(f"{flag} takes a number, got {raw!r}") from None
        if not bound(value):
            raise HeadConfigError(f"{flag} must be {low}, got {value:g}")
        if value:
            needs_fused(flag)
        values[key] = value
    convention = getattr(args, "lm_head_smoothing_convention", None)
    if convention is not None:
        if convention not in ("megatron", "torch"):
            raise HeadConfigError(f"--lm-head-smoothing-convention {convention!r}: use megatron (eps = alpha V / "
                                  f"(V - 1), Megatron-Core's) or torch (eps = alpha)")
        if convention != "megatron":
            needs_fused("--lm-head-smoothing-convention")
        values["smoothing_convention"] = convention
    path = getattr(args, "lm_head_class_weights", None)
    if path is not None:
        needs_fused("--lm-head-class-weights")
        values["ce_weight"] = read_class_weights(path)
    return FusedLossConfig(**values)


def read_class_weights(path: str) -> tuple:
    """V class weights from ``path`` (``--lm-head-class-weights``): a 1-D tensor saved by ``torch.save`` (``.pt``,
    ``.pth``) or whitespace-separated numbers; finite and >= 0. One-line HeadConfigError otherwise (the count is
    checked against the head's vocabulary when the head is installed)."""
    flag = f"--lm-head-class-weights {path}"
    if not os.path.isfile(path):
        raise HeadConfigError(f"{flag}: no such file")
    try:
        if path.endswith((".pt", ".pth")):
            t = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(t, torch.Tensor) and t.dim() == 1):
                raise ValueError("not a 1-D tensor")
            w = tuple(float(v) for v in t.double().tolist())
        else:
            with open(path) as f:
                w = tuple(float(v) for v in f.read().split())
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        raise HeadConfigError(f"{flag}: not a list of numbers or a 1-D tensor ({str(exc).splitlines()[0]})") from None
    if len(w) < 2 or not all(math.isfinite(v) and v >= 0 for v in w):
        raise HeadConfigError(f"{flag}: class weights must be at least 2 finite numbers >= 0 (one per class)")
    return w


def check_arguments(argv: List[str], cpu: Optional[bool] = None) -> List[str]:
    """The head and probe options of a Megatron-LM command line, checked before Megatron-LM parses it (and
    prints its argument dump). Raises :class:`HeadConfigError` (:class:`ConfigError` for a hybrid layer pattern the
    chosen spec does not build, see :func:`check_hybrid_arguments`) with one line for a bad option; returns the
    warnings (one line each) and, last, the one line saying which head, loss and probe are active. ``cpu``: whether
    the run is in CPU mode (None: no CUDA)."""
    args, _ = _option_parser().parse_known_args(argv)
    check_hybrid_arguments(args, (not torch.cuda.is_available()) if cpu is None else cpu)
    warnings: List[str] = []
    rank = args.lm_head_rank
    if rank is not None:
        rank = _int(args, "--lm-head-rank")
        if rank < 1:
            raise HeadConfigError(f"--lm-head-rank must be >= 1, got {rank}: omit it to keep Megatron's dense head")
        hidden = _int(args, "--hidden-size")
        if hidden is not None and rank > hidden:
            raise HeadConfigError(f"--lm-head-rank {rank} exceeds the hidden size {hidden} (--hidden-size): "
                                  f"a rank-r head needs 1 <= r <= {hidden}")
        if not args.untie_embeddings_and_output_weights:
            raise HeadConfigError("--lm-head-rank replaces the output layer, which is tied to the input embedding: "
                                  "add --untie-embeddings-and-output-weights")
    head_config = head_config_from_args(args, rank)
    if head_config is not None and head_config.kind == "low_rank" and rank is None:  # r from --lm-head-options
        rank = head_config.resolved_options().r
        hidden = _int(args, "--hidden-size")
        if not 1 <= rank <= (hidden or rank):
            raise HeadConfigError(f"--lm-head-options r={rank}: a rank-r head needs 1 <= r <= the hidden size "
                                  f"{hidden} (--hidden-size)")
    if head_config is not None and head_config.kind != "dense" and not args.untie_embeddings_and_output_weights:
        raise HeadConfigError(f"--lm-head-type {head_config.kind} replaces the output layer, which is tied to the input "
                              "embedding: add --untie-embeddings-and-output-weights")
    if args.lm_head_init not in INIT_METHODS:
        raise HeadConfigError(f"--lm-head-init {args.lm_head_init!r} is not an initialisation of the low-rank head: "
                              f"use one of {', '.join(INIT_METHODS)}")
    if rank or (head_config is not None and head_config.kind == "low_rank"):
        refuse_from_dense_before_load(head_config or LowRankHeadConfig(rank=rank, init=args.lm_head_init),
                                      "--lm-head-init from_dense (the model provider runs before --load)",
                                      note=" (CHECKPOINT: the dense run's --save directory; resume with "
                                           "--lm-head-rank R --load DIR --no-load-optim)")
    if args.lm_head_fused_loss and args.cross_entropy_loss_fusion:
        raise HeadConfigError("--lm-head-fused-loss computes the cross-entropy inside the head, and "
                              "--cross-entropy-loss-fusion selects Megatron's own fused cross-entropy (both would "
                              "run, on different steps): drop one of them")
    _fused_loss_config(args)
    intervals = [_int(args, n, 0) for n in ("--probe-interval", "--probe-update-interval", "--probe-rank-interval")]
    budget = _int(args, "--probe-rank-token-budget")
    for name in ("--probe-general-tokens", "--probe-general-iterations"):
        _int(args, name, 1)
    if intervals[2]:
        if budget < 2:
            raise HeadConfigError(f"--probe-rank-token-budget must be >= 2, got {budget}")
        iters, gbs, seq = (_int(args, n, 1) for n in ("--train-iters", "--global-batch-size", "--seq-length"))
        if iters and gbs and seq:
            mp = (_int(args, "--tensor-model-parallel-size", 1) or 1) * (
                _int(args, "--pipeline-model-parallel-size", 1) or 1)
            dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // mp)
            seen = iters * gbs * seq // dp  # tokens one data-parallel rank's head sees in the whole run
            if budget > seen:
                warnings.append(f"--probe-rank-token-budget {budget} exceeds the {seen} tokens one data-parallel "
                                f"rank sees in this run ({iters} iterations x {gbs // dp} sequences x {seq} "
                                f"tokens): the rank figures will never be reported; lower the budget to <= {seen}")
    if head_config is not None and head_config.kind not in ("dense", "low_rank"):
        head = f"{head_config}"
    else:
        head = (f"low-rank rank {rank} (init {args.lm_head_init})" if rank else "Megatron's dense output layer")
    loss = ("fused with the head (no [s, b, V/tp] logits)" if args.lm_head_fused_loss else
            "Megatron's fused cross-entropy" if args.cross_entropy_loss_fusion else "Megatron's cross-entropy")
    if any(intervals):
        probe = (f"interval {intervals[0]}, update_interval {intervals[1]}, rank_interval {intervals[2]} "
                 f"(budget {budget} tokens), log dir {args.probe_log_dir or 'none (Megatron writers only)'}")
    else:
        probe = "off"
    warnings.append(f"head: {head}; loss: {loss}; probe: {probe}")
    return warnings


def check_hybrid_arguments(args, cpu: bool) -> None:
    """``--hybrid-layer-pattern`` against the hybrid stack spec the run will build: megatron-bottleneck's local
    spec (``--spec megatron_bottleneck.models.hybrid LOCAL_HYBRID_STACK_SPEC``, or no ``--spec`` in CPU mode) builds
    attention ``*`` and MLP ``-`` layers (``|`` pipeline stages); Megatron's TE spec does not run in CPU mode. One
    line (:class:`ConfigError`) otherwise."""
    spec = tuple(args.spec) if getattr(args, "spec", None) else None
    if cpu and spec in MEGATRON_HYBRID_SPECS:
        raise ConfigError(f"--spec {' '.join(spec)} is Megatron's Transformer Engine hybrid stack, which does not run "
                          f"in CPU mode: omit --spec (the runner then picks --spec {' '.join(LOCAL_HYBRID_SPEC)})")
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if pattern is None or not (spec == LOCAL_HYBRID_SPEC or (spec is None and cpu)):
        return
    which = ("megatron-bottleneck's local hybrid spec, the CPU mode's default," if spec is None else
             f"--spec {' '.join(spec)}")
    other = sorted(set(pattern) - set("*-|/"))
    if other:
        mamba = ("; Mamba 'M' layers need Mamba's CUDA kernels and Transformer Engine: on GPUs use --spec "
                 f"{' '.join(MEGATRON_HYBRID_SPECS[0])}" if "M" in other else
                 f": use --spec {' '.join(MEGATRON_HYBRID_SPECS[0])} (Transformer Engine, GPUs)")
        raise ConfigError(f"--hybrid-layer-pattern {pattern!r}: {which} builds attention '*' and MLP '-' layers, not "
                          f"{', '.join(repr(c) for c in other)}{mamba}")
    if "/" in pattern:
        raise ConfigError(f"--hybrid-layer-pattern {pattern!r} declares multi-token prediction ('/'), which {which} "
                          "does not build: drop the '/...' depths")


def head_config_from_args(args, rank: Optional[int] = None) -> Optional[HeadConfig]:
    """The head of ``--lm-head-type`` / ``--lm-head-options`` (with ``--lm-head-rank`` / ``--lm-head-init`` for
    low_rank), checked; None without ``--lm-head-type`` (then ``--lm-head-rank`` alone decides). One-line
    :class:`HeadConfigError` for an unknown kind or option, or a rank given with another kind."""
    kind = getattr(args, "lm_head_type", None)
    text = getattr(args, "lm_head_options", "") or ""
    if kind is None:
        if text:
            raise HeadConfigError("--lm-head-options needs --lm-head-type (e.g. --lm-head-type mos "
                                  "--lm-head-options k=4)")
        return None
    options = parse_head_options(text, what="--lm-head-options")
    rank = getattr(args, "lm_head_rank", None) if rank is None else rank
    if kind == "low_rank":
        if rank is not None:
            options.setdefault("r", str(rank))
        options.setdefault("init", getattr(args, "lm_head_init", "balanced"))
    elif rank is not None:
        raise HeadConfigError(f"--lm-head-rank is the low-rank head's rank, but --lm-head-type is {kind}: drop "
                              "--lm-head-rank, or use --lm-head-type low_rank")
    head = HeadConfig(kind, options, seed=getattr(args, "seed", None))
    try:
        head.resolved_options()
    except HeadConfigError as exc:
        raise HeadConfigError(f"--lm-head-type {kind} --lm-head-options {text!r}: {exc}") from None
    return head


def extra_args_provider(other: Optional[Callable] = None) -> Callable:
    """``add_arguments`` chained after another ``extra_args_provider`` (or alone for None)."""
    if other is None or getattr(other, _WRAPPED, False):
        return add_arguments if other is None else other

    def provider(parser):
        parser = other(parser)
        return add_arguments(parser)

    setattr(provider, _WRAPPED, True)
    return provider


def _get_args():
    from megatron.training import get_args

    return get_args()


# ------------------------------------------------------------------------------------- head
def _fail(exc: BaseException) -> None:
    """One line from one rank, then a clean exit of every rank that got here (no traceback)."""
    try:
        first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    except Exception:
        first = True
    _exit_one_line(exc, first)


SILENT_RANK_GRACE_S = 15.0
"""How long a rank that does not print an error everyone hit waits before exiting: torchrun stops every rank
once one exits, so the printing rank must get to print first (it exits at once, and torchrun then stops the
waiting ones)."""


def _exit_one_line(exc: BaseException, prints: bool) -> None:
    """Exit status 2 on every rank; the one line on the rank that ``prints``."""
    if prints:
        print(f"{PREFIX} error: {exc}", file=sys.stderr, flush=True)
    else:
        time.sleep(SILENT_RANK_GRACE_S)
    raise SystemExit(2) from None


def install_head_from_args(models, args=None, integration: Optional["MegatronLMIntegration"] = None):
    """Install the head from ``--lm-head-type``/``--lm-head-options`` (any registered kind) or the low-rank head
    from ``--lm-head-rank``/``--lm-head-init`` on every model (chunk) that has an output layer, and the fused head +
    loss with ``--lm-head-fused-loss``; a model or a list of models; returns what it was given. ``integration``:
    the :class:`MegatronLMIntegration` whose head line is printed once (default: see :func:`integration_of`)."""
    args = _get_args() if args is None else args
    rank = getattr(args, "lm_head_rank", None)
    fused = getattr(args, "lm_head_fused_loss", False)
    kind = getattr(args, "lm_head_type", None)
    if kind is not None and kind not in ("dense", "low_rank"):
        try:
            head_config = head_config_from_args(args)
            chunks = models if isinstance(models, (list, tuple)) else [models]
            for m in chunks:
                install_head(m, head_config)
            if fused:
                enable_fused_loss(models, _fused_loss_config(args))
        except HeadConfigError as exc:
            _fail(exc)
        integration_of(integration).log_head(f"installed the LM head {head_config} on the output layer")
        return models
    if kind == "low_rank" and not rank:
        rank = head_config_from_args(args).resolved_options().r
    if not rank:
        if fused:
            try:
                enable_fused_loss(models, _fused_loss_config(args))
            except HeadConfigError as exc:
                _fail(exc)
        return models
    head = LowRankHeadConfig(rank=int(rank), init=getattr(args, "lm_head_init", "balanced"))
    chunks = models if isinstance(models, (list, tuple)) else [models]
    installed = 0
    try:
        for m in chunks:
            before = getattr(m, "output_layer", None)
            install_low_rank_head(m, head)
            if isinstance(getattr(m, "output_layer", None), LowRankOutputLayer) and before is not m.output_layer:
                installed += 1
    except HeadConfigError as exc:
        _fail(exc)
    if fused:
        try:
            enable_fused_loss(models, _fused_loss_config(args))
        except HeadConfigError as exc:
            _fail(exc)
    if installed:
        integration_of(integration).log_head(f"installed a rank-{head.rank} low-rank LM head (init={head.init}) "
                                             f"on the output layer")
    return models


# ------------------------------------------------------------------------------------ probe
def real_vocab_size(args=None) -> Optional[int]:
    """The unpadded vocabulary: the tokenizer's ``vocab_size`` (what Megatron-LM pads to
    ``args.padded_vocab_size``), else ``args.vocab_size``."""
    args = _get_args() if args is None else args
    try:
        from megatron.training.global_vars import get_tokenizer

        tok = get_tokenizer()
        if tok is not None and getattr(tok, "vocab_size", None):
            return int(tok.vocab_size)
    except Exception:
        pass
    return int(args.vocab_size) if getattr(args, "vocab_size", None) else None


def _tensorboard_importable() -> bool:
    try:
        importlib.import_module("torch.utils.tensorboard")
    except Exception:
        return False
    return True


def _to_megatron_writers(step: int, figures) -> None:
    from megatron.training import global_vars

    scalars = {f"probe/{k}": float(v) for k, v in figures.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tb = global_vars.get_tensorboard_writer()
    if tb is not None:
        for k, v in scalars.items():
            tb.add_scalar(k, v, step)
    wb = global_vars.get_wandb_writer()
    if wb is not None:
        wb.log(scalars, step)


# ------------------------------------------------------------------------------ integration
class MegatronLMIntegration:
    """The Megatron-LM integration's state in one process: whether the command line was checked, whether the
    head line was printed, the run's :class:`GradientProbe` (built once, at the first :meth:`get_probe`) and the
    warnings given once.

    :func:`patch` creates the process's one and keeps it on the Megatron-LM ``pretrain`` it wraps (so a second
    ``patch()`` returns it, and :func:`integration_of` finds it); for the explicit wrapping create one and pass it
    to :func:`wrap_model_provider`, :func:`wrap_forward_step` and :func:`install_head_from_args` (or call its
    methods of the same names)."""

    def __init__(self) -> None:
        self.command_line_checked = False
        self.head_logged = False
        self.probe: Optional[GradientProbe] = None
        self.probe_made = False
        self.warned: Set[str] = set()

    # -- command line and head
    def check_command_line(self, cpu: Optional[bool] = None) -> None:
        """:func:`check_arguments` on this process's command line, once: an error is one line (rank 0) and exit
        status 2 on every rank, before Megatron-LM parses anything."""
        if self.command_line_checked:
            return
        self.command_line_checked = True
        try:
            lines = check_arguments(sys.argv[1:], cpu)
        except (HeadConfigError, ConfigError) as exc:
            _exit_one_line(exc, _rank() == 0)
        for i, line in enumerate(lines):
            _print0(line if i == len(lines) - 1 else f"warning: {line}")

    def log_head(self, message: str) -> None:
        """``message`` printed once per process, by the first tensor- and data-parallel rank."""
        if self.head_logged:
            return
        self.head_logged = True
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            print(f"{PREFIX} {message}", flush=True)

    def install_head_from_args(self, models, args=None):
        """:func:`install_head_from_args` with this state (a Megatron pre-wrap hook)."""
        return install_head_from_args(models, args, integration=self)

    def wrap_model_provider(self, model_provider: Callable) -> Callable:
        """A model provider that builds the user's model, then installs the head from the parsed arguments (each
        virtual-pipeline chunk is its own provider call). Idempotent."""
        if getattr(model_provider, _WRAPPED, False):
            return model_provider

        @functools.wraps(model_provider)
        def provider(*args, **kwargs):
            return self.install_head_from_args(model_provider(*args, **kwargs))

        setattr(provider, _WRAPPED, True)
        return provider

    # -- probe
    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            _print0(f"warning: {msg}")

    def get_probe(self) -> Optional[GradientProbe]:
        """The run's :class:`GradientProbe` (built at the first call, after Megatron-LM has parsed its arguments
        and loaded the checkpoint), or None when ``--probe-*-interval`` are all 0."""
        if self.probe_made:
            return self.probe
        self.probe_made = True
        args = _get_args()
        intervals = [getattr(args, k, 0) or 0 for k in ("probe_interval", "probe_update_interval",
                                                         "probe_rank_interval")]
        if not any(intervals):
            return None
        log_dir = getattr(args, "probe_log_dir", None)
        own_tb = False
        if not getattr(args, "tensorboard_dir", None) and log_dir:
            own_tb = _tensorboard_importable()
            if not own_tb:
                self.warn_once("tb", "tensorboard is not installed: probe figures go to "
                                     f"{os.path.join(log_dir, 'probe.jsonl')} only")
        vocab = real_vocab_size(args)
        cfg = ProbeConfig(interval=intervals[0], update_interval=intervals[1], rank_interval=intervals[2],
                          rank_token_budget=args.probe_rank_token_budget, vocab_size=vocab,
                          general_tokens=getattr(args, "probe_general_tokens", 256),
                          general_iterations=getattr(args, "probe_general_iterations", 32),
                          log_dir=log_dir, tensorboard=own_tb)
        probe = GradientProbe(cfg)
        probe.step = int(getattr(args, "iteration", 0) or 0)
        probe.on_record(_to_megatron_writers)
        atexit.register(self.finish_probe)  # the last step's figures when nobody wrapped Megatron-LM's train_step
        _print0(f"gradient probe on (interval={cfg.interval}, update_interval={cfg.update_interval}, "
                f"rank_interval={cfg.rank_interval}; vocabulary {vocab}, padded "
                f"{getattr(args, 'padded_vocab_size', None)}; starting at step {probe.step})")
        self.probe = probe
        return probe

    def finish_probe(self) -> None:
        """At exit: the probe's pending step (``end_step``) and its logs closed; a failure is one warning line."""
        if self.probe is None:
            return
        try:
            self.probe.remove()
        except Exception as exc:  # e.g. the process group is already gone
            _print0(f"warning: the probe's last step was not recorded ({type(exc).__name__}: {exc})")

    def wrap_forward_step(self, forward_step: Callable) -> Callable:
        """Megatron-LM ``forward_step`` that attaches this run's probe (from the arguments) to the model it is
        given. Idempotent; a no-op when the probe is off."""
        if getattr(forward_step, _WRAPPED, False):
            return forward_step
        wrapped = _wrap_forward_step(forward_step, self.get_probe)
        setattr(wrapped, _WRAPPED, True)
        return wrapped

    def probe_train_step(self, train_step: Callable) -> Callable:
        """Megatron-LM's ``train_step`` as the probe's step: :meth:`~GradientProbe.begin_step` with this step's
        micro-batch count (Megatron's ``get_num_microbatches()``, read afresh: the training loop has updated it for
        batch-size ramp-up before calling ``train_step``), then the step, then :meth:`~GradientProbe.end_step` (its
        one reduction and host transfer, after the schedule). Idempotent."""
        if getattr(train_step, _WRAPPED, False):
            return train_step

        @functools.wraps(train_step)
        def wrapped(*args, **kwargs):
            probe = self.get_probe()  # arguments parsed and checkpoint loaded by now: what the forward step builds
            if probe is not None:
                probe.begin_step(get_num_microbatches())
            out = train_step(*args, **kwargs)
            if probe is not None:
                probe.end_step()
            return out

        setattr(wrapped, _WRAPPED, True)
        return wrapped

    # -- patch
    def edit_pretrain_arguments(self, sig: inspect.Signature, a: dict, cpu: bool = False) -> None:
        """Megatron-LM's ``pretrain``: the model provider (core_v0.16) or the config's pre-wrap hooks (core_v0.19)
        install the head; the forward step gets the probe; the extra-arguments provider our options; in CPU mode a
        hybrid model config without a stack spec gets the local one (:func:`_use_local_hybrid_spec`)."""
        self.check_command_line(cpu)
        if a.get("model_provider") is not None:
            a["model_provider"] = self.wrap_model_provider(a["model_provider"])
        cfg = a.get("cfg_container")
        model_cfg = getattr(cfg, "model", None) if cfg is not None else None
        if model_cfg is not None and cpu:
            _use_local_hybrid_spec(model_cfg)
        if model_cfg is not None and hasattr(model_cfg, "pre_wrap_hooks"):
            if self.install_head_from_args not in model_cfg.pre_wrap_hooks:
                model_cfg.pre_wrap_hooks.append(self.install_head_from_args)
        if a.get("forward_step_func") is not None:
            a["forward_step_func"] = self.wrap_forward_step(a["forward_step_func"])
        if "extra_args_provider" in sig.parameters:
            a["extra_args_provider"] = extra_args_provider(a.get("extra_args_provider"))

    def edit_parse_arguments(self, _sig: inspect.Signature, a: dict, cpu: bool = False) -> None:
        """``parse_and_validate_args``: our options chained onto the caller's extra-arguments provider."""
        self.check_command_line(cpu)
        a["extra_args_provider"] = extra_args_provider(a.get("extra_args_provider"))


_INTEGRATION = "__megatron_bottleneck_integration__"


def patched_integration() -> Optional[MegatronLMIntegration]:
    """The :class:`MegatronLMIntegration` that :func:`patch` created in this process (kept on the
    ``megatron.training.training.pretrain`` it wrapped), None before ``patch()``."""
    training = sys.modules.get("megatron.training.training")
    return getattr(getattr(training, "pretrain", None), _INTEGRATION, None)


def integration_of(integration: Optional[MegatronLMIntegration] = None) -> MegatronLMIntegration:
    """``integration`` itself; None: the one :func:`patch` created (:func:`patched_integration`), else a new one."""
    if integration is not None:
        return integration
    return patched_integration() or MegatronLMIntegration()


def wrap_model_provider(model_provider: Callable, integration: Optional[MegatronLMIntegration] = None) -> Callable:
    """:meth:`MegatronLMIntegration.wrap_model_provider` of ``integration`` (default: :func:`integration_of`)."""
    return integration_of(integration).wrap_model_provider(model_provider)


def get_probe(integration: Optional[MegatronLMIntegration] = None):
    """The run's :class:`GradientProbe` (:meth:`MegatronLMIntegration.get_probe` of ``integration``, default: the
    one :func:`patch` created), or None when ``--probe-*-interval`` are all 0."""
    return integration_of(integration).get_probe()


def wrap_forward_step(forward_step: Callable, integration: Optional[MegatronLMIntegration] = None) -> Callable:
    """Megatron-LM ``forward_step`` that attaches the run's probe (from the arguments) to the model it is given
    (:meth:`MegatronLMIntegration.wrap_forward_step` of ``integration``, default: :func:`integration_of`).
    Idempotent; a no-op when the probe is off."""
    return integration_of(integration).wrap_forward_step(forward_step)


# ------------------------------------------------------------------------------------ patch
def _wrap_arguments(fn: Callable, edit: Callable[[inspect.Signature, dict], None]) -> Callable:
    """``fn`` with its bound arguments passed through ``edit(signature, arguments)`` (in place) first;
    idempotent (a wrapped function is returned as it is)."""
    if getattr(fn, _WRAPPED, False):
        return fn
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        edit(sig, bound.arguments)
        return fn(*bound.args, **bound.kwargs)

    setattr(wrapped, _WRAPPED, True)
    return wrapped


def _use_local_hybrid_spec(model_cfg) -> None:
    """CPU mode: a ``HybridModelConfig`` (core_v0.19 ``pretrain_hybrid.py``) with no stack spec (no ``--spec``), which
    Megatron would build with its Transformer Engine ``hybrid_stack_spec``, gets megatron-bottleneck's
    ``LOCAL_HYBRID_STACK_SPEC``; the saved args record it as ``--spec``. One line says so."""
    if getattr(model_cfg, "hybrid_stack_spec", False) is not None:  # not a hybrid config, or a spec given
        return
    if getattr(model_cfg, "transformer_impl", None) == "inference_optimized" or getattr(
            model_cfg, "restore_modelopt_state", False):  # Megatron's own choice then
        return
    model_cfg.hybrid_stack_spec = LOCAL_HYBRID_STACK_SPEC
    try:
        _get_args().spec = list(LOCAL_HYBRID_SPEC)
    except Exception:  # noqa: BLE001 (pretrain called without Megatron-LM's global args)
        pass
    _print0(f"CPU mode, no --spec: HybridModel is built with megatron-bottleneck's local hybrid stack spec (--spec "
            f"{' '.join(LOCAL_HYBRID_SPEC)}; Megatron's default hybrid_stack_spec needs Transformer Engine)")


def patch(cpu: Optional[bool] = None) -> MegatronLMIntegration:
    """Wrap Megatron-LM's ``pretrain`` (and, for core_v0.19, ``parse_and_validate_args``) so a
    ``pretrain_gpt.py`` gets the head, the probe and their arguments; returns the process's
    :class:`MegatronLMIntegration` (created here, kept on the wrapped ``pretrain``). Idempotent: a second call
    returns the first one's. ``cpu=None``: enable the CPU mode and the training CPU patches when CUDA is not
    available. Call it before the script runs ``from megatron.training import pretrain``."""
    existing = patched_integration()
    if existing is not None:
        return existing
    if cpu is None:
        cpu = not torch.cuda.is_available()
    done = []
    if cpu:
        quiet_megatron_warnings()
        enable_cpu_mode()  # megatron-core's redirections and, megatron.training being importable, its own
        done.append("CPU mode (megatron-core and megatron/training)")
    import megatron.training as mt
    import megatron.training.training as mtt

    if not hasattr(mtt, "pretrain"):
        raise RuntimeError(f"{PREFIX} megatron.training.training.pretrain not found; this "
                           "Megatron-LM version is not supported.")
    integration = MegatronLMIntegration()
    wrapped = _wrap_arguments(mtt.pretrain, functools.partial(integration.edit_pretrain_arguments, cpu=cpu))
    setattr(wrapped, _INTEGRATION, integration)
    mtt.pretrain = wrapped
    if hasattr(mt, "pretrain"):
        mt.pretrain = wrapped
    done.append("megatron.training.pretrain")
    if hasattr(mtt, "train_step"):
        mtt.train_step = integration.probe_train_step(mtt.train_step)
        done.append("megatron.training.training.train_step (probe step begin / end)")
    arguments = importlib.import_module("megatron.training.arguments")
    if hasattr(arguments, "parse_and_validate_args"):
        parse = arguments.parse_and_validate_args
        arguments.parse_and_validate_args = _wrap_arguments(
            parse, functools.partial(integration.edit_parse_arguments, cpu=cpu))
        done.append("megatron.training.arguments.parse_and_validate_args")
    _print0("patched " + ", ".join(done))
    return integration


# ------------------------------------------------------------------------------------- main
USAGE = ("usage: python -m megatron_bottleneck.megatron_lm path/to/pretrain_gpt.py|pretrain_hybrid.py "
         "<Megatron-LM args> "
         "[--lm-head-rank R] [--lm-head-init {balanced,orthogonal,from_dense}] [--lm-head-type KIND] "
         "[--lm-head-options k=v,...] [--probe-interval N] "
         "[--probe-update-interval N] [--probe-rank-interval N] [--probe-rank-token-budget T] "
         "[--probe-general-tokens N] [--probe-general-iterations N] "
         "[--probe-log-dir DIR]")


def _require_hybrid(script: str) -> None:
    """One line and exit status 2 when the installed megatron-core has no HybridModel (< 0.19)."""
    try:
        require_hybrid_model()
    except ConfigError:
        print(f"{PREFIX} error: {script} builds Megatron-Core's HybridModel, which needs megatron-core >= 0.19 and "
              f"Megatron-LM core_v0.19 or later (installed megatron-core {version('megatron-core')}; core_v0.16 has "
              "no pretrain_hybrid.py): upgrade both, or train a GPTModel with pretrain_gpt.py", file=sys.stderr)
        raise SystemExit(2) from None


def start_checkpoint_results_queue(argv: List[str]) -> bool:
    """:func:`~megatron_bottleneck.integrations.checkpoint_writer.start_writer_helpers` before the training script
    runs, when the run saves in torch_dist format (``--save`` given; ``--ckpt-format`` torch_dist, the default):
    the first save then does not import the script again in a spawned process, and a preemption signal does not
    kill the writer's helper mid-save. Returns whether it started one."""
    args, _ = _option_parser().parse_known_args(argv)
    if args.save is None or args.ckpt_format != "torch_dist":
        return False
    return start_writer_helpers()


def main(argv: Optional[List[str]] = None) -> None:
    """Run an unchanged Megatron-LM training script with :func:`patch` applied."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    script, rest = argv[0], argv[1:]
    if os.path.basename(script) == HYBRID_SCRIPT:
        _require_hybrid(script)
    if not os.path.isfile(script):
        print(f"{PREFIX} error: no such script: {script}", file=sys.stderr)
        raise SystemExit(2)
    cpu = not torch.cuda.is_available()
    if cpu:
        if "--distributed-backend" not in rest:
            rest += ["--distributed-backend", "gloo"]
        if "WORLD_SIZE" not in os.environ:  # plain `python`: one process, a local rendezvous
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    script_dir = os.path.dirname(os.path.abspath(script))
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    patch(cpu=cpu)
    start_checkpoint_results_queue(rest)
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")
