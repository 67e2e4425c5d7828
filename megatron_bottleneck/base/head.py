"""The head contract: what the gradient probe and the fused loss read of an LM head, and the one way to
find the head of a model.

A *head* is any module with Megatron's output-layer contract (``forward(hidden, weight=None,
runtime_gather_output=None) -> (logits, bias)``) whose logits are linear in its weight: logits
``[s, b, V/tp]`` = H W_local^T, vocab-parallel over the tensor-parallel group. What the rest of the package
reads of it is the typed protocol :class:`LMHead`:

* ``probe_view(weight=None) -> HeadView``: a factor F (the local vocab shard) and a mix M with W = F M, plus the
  real vocabulary, for the probe's exact figures;
* ``vocab_size``: the real (unpadded) vocabulary V; rows at global index >= V are Megatron's padding;
* ``loss(hidden, labels, weight=None, *, config=None, stats=None, logit_scale=1.0) -> [s, b]``: the per-token
  cross-entropy fused with the head (no ``[s, b, V/tp]`` logits), through ``megatron_bottleneck.ops``;
* ``loss_request`` (:class:`~megatron_bottleneck.base.loss.LossRequest`): whether its next forward with labels
  keeps a record of the fused loss, set by a reader before the forward;
* ``last_loss`` (:class:`~megatron_bottleneck.base.loss.FusedLossRecord` or None): its last fused pass's
  per-token statistics and inputs, kept when ``loss_request.record`` was set;
* ``tp_group`` and ``sequence_parallel`` as on Megatron's ``ColumnParallelLinear``.

:class:`megatron_bottleneck.heads.LowRankOutputLayer` and :class:`megatron_bottleneck.heads.DenseOutputLayer`
implement it; a new head type is one module implementing it (``megatron_bottleneck.heads.contract`` has the
shared fused-forward logic). A plain Megatron ``ColumnParallelLinear`` (or ``torch.nn.Linear``) head that does
not implement it is still probed: :func:`head_view` gives it the dense view (F = W, M = I).

Linear and non-linear heads. Both implement :class:`LMHead` (the common part: ``tp_group``,
``sequence_parallel``, ``vocab_size``, ``loss_request``, ``last_loss``, ``loss``), which is what
:func:`is_lm_head` tests. A head whose logits are linear in one weight (dense, low-rank) is a
:class:`LinearHead`: it adds ``probe_view`` and the probe's closed form applies (:func:`is_linear_head`). Any
other head (mixture of softmaxes, pointwise logit non-linearities, stacked heads) is a :class:`NonLinearHead`:
instead of ``probe_view`` it gives ``log_prob_fn() -> HeadLogProb``, the effective log-probabilities
u = log p(h) of this rank's vocabulary shard as a differentiable function of the head input and parameters,
which is all a general (matrix-free) probe needs. :func:`head_view` (the closed form's view) refuses a
non-linear head in one line; the gradient probe measures one through ``probe.general`` instead.

Plug-ins. :func:`register_head` ``(name, builder, options=OptionsDataclass)`` adds a head kind;
:class:`HeadConfig` (``kind`` + ``options``, parsed from ``"mos:k=4"``) names one; the builder gets a
:class:`HeadBuildContext` and the options and returns the head module, which :func:`check_head` checks
(``megatron_bottleneck.heads.install_head`` builds, checks and installs it). The built-in kinds are
registered by ``megatron_bottleneck.heads``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch

from .deprecation import warn_deprecated
from .errors import HeadConfigError
from .groups import group_rank, group_size
from .loss import FusedLossRecord, LossRequest

__all__ = ["HeadView", "LMHead", "LinearHead", "NonLinearHead", "HeadLogProb", "find_head", "head_view",
           "is_lm_head", "is_linear_head", "is_nonlinear_head", "HeadConfig", "HeadBuildContext", "HeadSpec",
           "HeadCost", "HeadRegistry", "HEADS",
           "register_head", "get_head_builder", "get_head_spec", "registered_heads", "check_head",
           "refuse_nonlinear", "parse_head_options"]


@dataclass(init=False)
class HeadView:
    """A head on this TP rank, as the probe sees it: ``W = factor @ mix`` (so col(W) lies in col(factor)).

    factor: F, the local vocab shard, ``(V_local, k)`` (a factor of W, not a basis: its columns need not be
    independent, nor span only col(W) when M is rank-deficient). mix: M, ``(k, D)``, replicated over TP; None
    stands for the identity (dense head, F = W, k = D). vocab_start: global vocabulary index of F's row 0.
    vocab_size: the real (unpadded) V; rows at global index >= vocab_size are padding. softcap: c when the head
    outputs x = c tanh(z / c) of its linear logits z = F M h (Gemma's final-logit softcapping), else None: the
    probe takes G at z, through the cap (dL/dz = dL/dx (1 - (x / c)^2)), on the unfused path as the fused one.

    ``basis`` (attribute and keyword) is the deprecated name of ``factor``.
    """

    factor: torch.Tensor
    mix: Optional[torch.Tensor]
    vocab_start: int
    vocab_size: int
    softcap: Optional[float] = None

    def __init__(self, factor: Optional[torch.Tensor] = None, mix: Optional[torch.Tensor] = None,
                 vocab_start: int = 0, vocab_size: int = 0, softcap: Optional[float] = None, *,
                 basis: Optional[torch.Tensor] = None):
        if basis is not None:
            if factor is not None:
                raise TypeError("HeadView takes factor= (basis= is its deprecated name), not both")
            warn_deprecated("HeadView(basis=)", "HeadView(factor=)")
            factor = basis
        if factor is None:
            raise TypeError("HeadView needs factor= (F, the local vocab shard of W = F M)")
        self.factor, self.mix, self.vocab_start, self.vocab_size = factor, mix, vocab_start, vocab_size
        self.softcap = softcap

    @property
    def basis(self) -> torch.Tensor:
        """Deprecated name of :attr:`factor`."""
        warn_deprecated("HeadView.basis", "HeadView.factor")
        return self.factor

    def valid_rows(self) -> int:
        """Rows of ``factor`` that are real vocabulary (the rest is Megatron's padding)."""
        return int(max(0, min(self.factor.shape[0], self.vocab_size - self.vocab_start)))


@runtime_checkable
class LMHead(Protocol):
    """The head contract's common part (see the module docstring), linear or not. Shapes: hidden ``[s, b, D]``
    (``[s/tp, b, D]`` under sequence parallelism), labels ``[s, b]``, loss ``[s, b]`` float32."""

    tp_group: Any
    sequence_parallel: bool
    vocab_size: int
    loss_request: LossRequest
    last_loss: Optional[FusedLossRecord]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
             config: Any = None, stats: Any = None, logit_scale: float = 1.0) -> torch.Tensor:
        """Per-token cross-entropy ``[s, b]`` of ``logit_scale`` x this head's logits (fused where the head's
        math allows, never building the ``[s, b, V/tp]`` logits then)."""


@runtime_checkable
class LinearHead(LMHead, Protocol):
    """A head whose logits are linear in one weight, logits = H W^T with W = F M: the probe's closed form."""

    def probe_view(self, weight: Optional[torch.Tensor] = None) -> "HeadView":
        """The probe's view of this rank's shard; ``weight`` is the one passed to forward, if any."""


@dataclass
class HeadLogProb:
    """The effective log-probabilities of a head on this TP rank, as a function: what a general probe reads.

    ``fn(params, h) -> u``: h ``[T, D]`` the head input for T tokens, the same tensor on every TP rank (under
    sequence parallelism the caller gathers the sequence first); ``params`` a dict name -> tensor with the keys
    of :attr:`params` (the head's parameters u depends on, names as in ``head.named_parameters()``); u
    ``[T, n_valid]`` = log p(vocab_start + j | h_t) for the real rows j < n_valid of this rank's vocab shard
    (Megatron's padding rows left out), in float32 for 16-bit h and parameters (the softmax in float32, as
    Megatron's cross-entropy: ``base.tp_autograd.softmax_dtype``), else in h's dtype.

    * Token-wise: u[t] depends on h[t] only, so a caller chunks over tokens by slicing h (every TP rank must
      pass the same T: the normalisers are collectives).
    * Normalised over the whole vocabulary: sum over ranks and j of exp(u[t, j]) = 1.
    * Differentiable in h and in every params entry, under autograd and ``torch.func.vjp`` / ``jvp`` / ``grad``
      (not ``vmap``), with the TP convention of :mod:`megatron_bottleneck.base.tp_autograd`: h and the
      replicated params are replicated, u is sharded. Hence a VJP with this rank's cotangent columns g
      ``[T, n_valid]`` (e.g. its columns of G = p - onehot) returns, on every rank, the *full* J^T g summed over
      all vocab shards for h and for the replicated params (the all-reduce happens inside), and this rank's
      shard's gradient for the sharded params; a JVP with replicated tangents returns this rank's columns of du.
    * ``sharded``: names of params sharded over the vocabulary (dim 0, like ``weight``); the others are
      replicated over TP.

    ``__call__(h, params=None)`` evaluates it at the head's current parameters (or ``params``).
    """

    fn: Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    params: Dict[str, torch.Tensor]
    sharded: FrozenSet[str]
    vocab_start: int
    vocab_size: int
    n_valid: int
    tp_group: Any = None
    logits_fn: Optional[Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]] = None
    """For a head whose loss is the cross-entropy of logits z with fn = log_softmax(z) (the ``stacked`` and
    ``decoupled`` heads): z's function (fn's signature and TP convention, not normalised). The general probe then
    runs through z, G = dL/dz: the same figures without z-loss (G sums to 0 per token and the update and Gram
    are centred), and the z-loss's 2 zeta lse p term, which log p cannot carry, with it."""

    def __call__(self, h: torch.Tensor, params: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        return self.fn(self.params if params is None else params, h)


@runtime_checkable
class NonLinearHead(LMHead, Protocol):
    """A head whose log-probabilities are not linear in one weight (no ``probe_view``): it gives them as a
    function instead, :class:`HeadLogProb`. ``head_input_size``: D, the width of h."""

    head_input_size: int

    def log_prob_fn(self) -> HeadLogProb:
        """u = log p(h) of this rank's vocab shard as a function of (params, h) (see :class:`HeadLogProb`)."""


def is_lm_head(module) -> bool:
    """Whether ``module`` implements :class:`LMHead` (the common part; linear or non-linear)."""
    return isinstance(module, LMHead)


def is_linear_head(module) -> bool:
    """Whether ``module`` is a :class:`LinearHead` (``probe_view``: the probe's closed form applies)."""
    return isinstance(module, LinearHead)


def is_nonlinear_head(module) -> bool:
    """Whether ``module`` implements the contract without ``probe_view`` (a :class:`NonLinearHead` or an
    incomplete head): the linear probe cannot measure it."""
    return is_lm_head(module) and not is_linear_head(module)


def refuse_nonlinear(head) -> None:
    """Raise :class:`HeadConfigError` (one line) for a head the linear probe's closed form cannot measure."""
    if is_nonlinear_head(head):
        raise HeadConfigError(
            f"the linear probe's view (head_view: W = F M) needs logits linear in one weight (dense, low-rank); "
            f"the {type(head).__name__} head is not: GradientProbe measures it through its log_prob_fn() (the "
            f"general probe, megatron_bottleneck.probe.general).")


def head_view(head, weight: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> "HeadView":
    """The probe's view of any head: its own ``probe_view`` when it implements :class:`LMHead`, else the dense
    view of a module whose ``weight`` is the local vocab shard ``(V/tp, D)`` (Megatron's
    ``ColumnParallelLinear``, ``torch.nn.Linear``). ``vocab_size`` overrides the real vocabulary. A
    :class:`NonLinearHead` has no such view: refused with :class:`HeadConfigError` in one line."""
    refuse_nonlinear(head)
    if is_linear_head(head):
        view = head.probe_view(weight=weight)
    else:
        w = head.weight if weight is None else weight
        group = getattr(head, "tp_group", None)
        rank, size = group_rank(group), group_size(group)
        rows = w.shape[0]
        view = HeadView(factor=w.detach(), mix=None, vocab_start=rank * rows,
                        vocab_size=int(getattr(head, "output_size", rows * size)))
    if vocab_size is not None:
        view = HeadView(view.factor, view.mix, view.vocab_start, int(vocab_size), view.softcap)
    return view



def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Through wrappers that keep the model in ``.module`` (Megatron DDP, Float16Module, FSDP)."""
    while not hasattr(module, "output_layer") and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module
    return module


def find_head(model) -> Optional[torch.nn.Module]:
    """The LM head (``output_layer``) of a model, a wrapped model or a list of model chunks.

    Looks through wrappers that hold the model in ``.module``; for a list of (virtual pipeline) chunks takes
    the last chunk that holds a head. Returns None where this rank holds no head (a chunk built with
    ``post_process=False``). A module without an ``output_layer`` of its own (e.g. a LightningModule holding
    a Megatron model) is searched for the first submodule that has one.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in reversed(chunks):
        m = _unwrap(chunk)
        if not hasattr(m, "output_layer") and isinstance(m, torch.nn.Module):
            m = next((sub for sub in m.modules() if hasattr(sub, "output_layer")), m)
        if getattr(m, "post_process", True) is False:
            continue
        head = getattr(m, "output_layer", None)
        if head is not None:
            return head
    return None


# ------------------------------------------------------------------------------------------ head plug-ins
@dataclass
class HeadConfig:
    """Which head to build: a registered ``kind`` and its ``options``.

    ``HeadConfig("mos", {"k": 4})``, or parsed: ``HeadConfig.parse("mos:k=4,proj_std=0.1")`` (what
    ``--heads dense,low_rank:r=64,mos:k=4`` style lists and ``--lm-head-type`` / ``--lm-head-options`` give).
    Option values are strings or typed values; :meth:`resolved_options` turns them into the kind's options
    dataclass (types from its fields), refusing an unknown kind or option in one line.
    """

    kind: str = "dense"
    """A registered head kind (:func:`registered_heads`): built in ``dense``, ``low_rank``, ``mos``,
    ``sigsoftmax``, ``softcap``, ``monotone``, ``stacked``."""
    options: Dict[str, Any] = field(default_factory=dict)
    """The kind's options by name (fields of its options dataclass); missing ones take their defaults."""
    seed: Optional[int] = None
    """Seed of the head's TP-invariant initial draws (not part of the ``kind:options`` string); None:
    ``torch.initial_seed()``."""

    @classmethod
    def parse(cls, text: str, seed: Optional[int] = None) -> "HeadConfig":
        """``"kind"`` or ``"kind:name=value,name=value"`` (whitespace ignored)."""
        text = (text or "").strip()
        kind, _, rest = text.partition(":")
        kind = kind.strip()
        if not kind:
            raise HeadConfigError(f"head {text!r}: give a kind, e.g. 'mos:k=4' (known: {', '.join(registered_heads())})")
        return cls(kind, parse_head_options(rest, what=f"head {text!r}"), seed)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{opts}" if opts else self.kind

    def spec(self, registry: Optional["HeadRegistry"] = None) -> "HeadSpec":
        return get_head_spec(self.kind, registry)

    def resolved_options(self, registry: Optional["HeadRegistry"] = None):
        """The options as the kind's options dataclass (or a dict for a kind registered without one)."""
        return self.spec(registry).make_options(self.options)


def parse_head_options(text: str, what: str = "head options") -> Dict[str, str]:
    """``"k=4,d=8"`` -> ``{"k": "4", "d": "8"}`` (values stay strings; the kind's dataclass types them)."""
    out: Dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise HeadConfigError(f"{what}: option {item!r} is not name=value (e.g. k=4)")
        out[name.strip()] = value.strip()
    return out


@dataclass
class HeadBuildContext:
    """What a head builder gets besides its options: the shapes and settings of the head it replaces."""

    hidden_size: int
    """D, the width of the head input h."""
    vocab_size: int
    """The padded vocabulary (a multiple of the TP size): rows of the full weight."""
    real_vocab_size: int
    """The tokenizer's vocabulary V <= vocab_size (the rest is Megatron's padding)."""
    config: Any
    """The model's Megatron ``TransformerConfig`` (params_dtype, init_method_std, sequence_parallel, ...)."""
    tp_group: Any = None
    """The vocab-parallel group (None: one rank)."""
    seed: Optional[int] = None
    """Seed of TP-invariant draws (the same full weights at every TP size); None: ``torch.initial_seed()``."""
    device: Any = None
    """Where the parameters go (None: the config's default)."""
    gather_output: bool = False
    """Whether the replaced head gathered its logits over TP."""
    old_head: Optional[torch.nn.Module] = None
    """The head being replaced (e.g. for an initialisation from it), or None."""


def _type_value(name: str, tp: Any, value: Any, where: str) -> Any:
    """``value`` (a string from a command line, or already typed) as type ``tp`` of a dataclass field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _type_value(name, non_none[0], value, where)
    if origin is typing.Literal:
        if value not in args:
            raise HeadConfigError(f"{where}: option {name}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        article = "an" if tp.__name__[0] in "aeiou" else "a"
        raise HeadConfigError(f"{where}: option {name}={value!r} is not {article} {tp.__name__}") from None
    return value


@dataclass(frozen=True)
class HeadCost:
    """Analytic cost of a head per token: ``params`` (trainable parameters, V the real vocabulary, TP padding not
    counted) and ``flops_per_token`` (forward FLOPs of its matrix products, 2 per multiply-add; a training step
    is about 3x)."""

    params: int
    flops_per_token: int


@dataclass
class HeadSpec:
    """A head kind: everything the package knows about it, in one place.

    ``builder(context: HeadBuildContext, options) -> module``; ``options`` its options dataclass (None: the
    options are passed as a dict, unchecked); ``cost(options, D, V) -> HeadCost`` its analytic cost (None:
    unknown, reported n/a by the zoo); ``probe`` the gradient probe's path for it: ``"linear"`` (the closed form,
    the head gives ``probe_view``), ``"general"`` (CG through ``log_prob_fn``) or None (undeclared: the probe
    decides from the module)."""

    name: str
    builder: Callable[[HeadBuildContext, Any], torch.nn.Module]
    options: Optional[type] = None
    description: str = ""
    cost: Optional[Callable[[Any, int, int], HeadCost]] = None
    probe: Optional[str] = None

    def make_options(self, given: Mapping[str, Any]):
        where = f"head kind {self.name!r}"
        if self.options is None:
            return dict(given)
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            known = ", ".join(fields) or "none"
            raise HeadConfigError(f"{where} has no option {unknown[0]!r} (its options: {known})")
        hints = typing.get_type_hints(self.options)
        kwargs = {n: _type_value(n, hints[n], v, where) for n, v in given.items()}
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise HeadConfigError(f"{where} needs option {missing[0]} (e.g. {self.name}:{missing[0]}=...)")
        try:
            return self.options(**kwargs)
        except HeadConfigError as exc:
            raise HeadConfigError(f"{where}: {exc}") from None


class HeadRegistry:
    """Head kinds by name (:class:`HeadSpec`), in registration order. The package's built-in kinds live in
    :data:`HEADS`, the registry every call uses unless given another (``registry=``); a separate registry
    (``HeadRegistry()``) keeps an experiment's kinds apart from it."""

    def __init__(self):
        self._specs: Dict[str, HeadSpec] = {}

    def register(self, spec: HeadSpec, replace: bool = False) -> HeadSpec:
        name = spec.name
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise HeadConfigError(f"head kind name {name!r} must be a lower-case identifier (e.g. 'my_head')")
        if not callable(spec.builder):
            raise HeadConfigError(f"head kind {name!r}: the builder {spec.builder!r} is not callable")
        if spec.options is not None and not dataclasses.is_dataclass(spec.options):
            raise HeadConfigError(f"head kind {name!r}: options must be a dataclass type, got {spec.options!r}")
        if spec.cost is not None and not callable(spec.cost):
            raise HeadConfigError(f"head kind {name!r}: cost must be a function (options, D, V) -> HeadCost")
        if name in self._specs and not replace:
            raise HeadConfigError(f"head kind {name!r} is already registered (pass replace=True to override it)")
        if spec.probe not in (None, "linear", "general"):
            raise HeadConfigError(f"head kind {spec.name!r}: probe must be 'linear', 'general' or None, "
                                  f"got {spec.probe!r}")
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> HeadSpec:
        """The :class:`HeadSpec` of a registered kind; an unknown one is refused in one line."""
        if name not in self._specs:
            raise HeadConfigError(f"unknown head kind {name!r}: known kinds are {', '.join(self.names())} "
                                  f"(register one with megatron_bottleneck.register_head)")
        return self._specs[name]

    def names(self) -> List[str]:
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs


HEADS = HeadRegistry()
"""The default registry: the built-in kinds (registered by :mod:`megatron_bottleneck.heads`) and yours."""


def register_head(name: str, builder: Callable[[HeadBuildContext, Any], torch.nn.Module], options: Optional[type] = None,
                  *, description: str = "", replace: bool = False, cost=None, probe: Optional[str] = None,
                  registry: Optional[HeadRegistry] = None) -> HeadSpec:
    """Register a head kind ``name`` (lower-case identifier) built by ``builder(context, options)``.

    ``options``: a dataclass whose fields are the kind's options (typed; with defaults where optional;
    ``__post_init__`` may raise :class:`HeadConfigError` for bad values); None passes a dict. ``cost``:
    ``fn(options, D, V) -> HeadCost``; ``probe``: ``"linear"`` / ``"general"`` (see :class:`HeadSpec`). The
    module the builder returns is checked by :func:`check_head` each time it is built (one line naming what it
    lacks). ``replace=True`` overrides an existing kind. ``registry``: default :data:`HEADS`. Returns the
    :class:`HeadSpec`.
    """
    spec = HeadSpec(name, builder, options, description, cost, probe)
    return (registry or HEADS).register(spec, replace=replace)


def get_head_spec(name: str, registry: Optional[HeadRegistry] = None) -> HeadSpec:
    """The :class:`HeadSpec` of a registered kind; an unknown one is refused in one line."""
    return (registry or HEADS).get(name)


def get_head_builder(name: str) -> Callable[[HeadBuildContext, Any], torch.nn.Module]:
    """The builder of a registered head kind."""
    return get_head_spec(name).builder


def registered_heads(registry: Optional[HeadRegistry] = None) -> List[str]:
    """Names of the registered head kinds, in registration order."""
    return (registry or HEADS).names()


_COMMON = ("tp_group", "sequence_parallel", "vocab_size", "loss_request", "last_loss")


def check_head(module, name: str = "") -> torch.nn.Module:
    """``module`` if it implements the head contract (:class:`LinearHead` or :class:`NonLinearHead`, and
    ``sharded_state_dict`` for distributed checkpoints), else :class:`HeadConfigError` naming what it lacks."""
    what = f"head kind {name!r}" if name else "the head"
    if not isinstance(module, torch.nn.Module):
        raise HeadConfigError(f"{what}: the builder returned {type(module).__name__}, not a torch.nn.Module")
    lacks: List[str] = [a for a in _COMMON if not hasattr(module, a)]
    lacks += [m for m in ("forward", "loss", "sharded_state_dict") if not callable(getattr(module, m, None))]
    if not callable(getattr(module, "probe_view", None)):
        if not callable(getattr(module, "log_prob_fn", None)):
            lacks.append("probe_view (linear head) or log_prob_fn (non-linear head)")
        elif not hasattr(module, "head_input_size"):
            lacks.append("head_input_size")
    if lacks:
        raise HeadConfigError(f"{what} ({type(module).__name__}) does not implement the head contract: it lacks "
                              f"{', '.join(lacks)} (see megatron_bottleneck.base.head)")
    return module
