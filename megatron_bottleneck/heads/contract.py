"""The head contract's shared forward, and the loss of heads whose logits are linear in a weight.

A head class mixes in :class:`HeadContractMixin` (first in its bases) for ``forward`` (the head's loss while a
:class:`LossContext` is set on the head by the fused model, else ``logits_forward``), ``loss_request`` and
``last_loss``, and defines ``logits_forward(input_, weight, runtime_gather_output) -> (logits, bias)`` (its unfused
forward: Megatron's output-layer contract, logits ``[s, b, V/tp]``), ``loss(...)``, ``probe_view(weight) ->
HeadView`` and the attributes ``tp_group``, ``sequence_parallel``, ``vocab_size``.

A head whose logits are z = u F^T for an input u and a vocab-sharded factor F (dense, low-rank, stacked) mixes in
:class:`LinearLossMixin` instead: its ``loss`` runs :func:`megatron_bottleneck.ops.linear_cross_entropy` (the
``[s, b, V/tp]`` logits never built) over

* ``loss_input(hidden) -> u``: ``[s, b, k]`` over the full sequence, in the TP region (copied into it, or
  all-gathered under sequence parallelism), so that dL/du is reduced over the vocab shards by the region's
  backward, exactly as for the unfused head;
* ``loss_weight(weight) -> F``: this rank's vocab shard ``[V_local, k]`` of the factor multiplying u.

:class:`LossContext` is set only by :class:`megatron_bottleneck.heads.model_loss.FusedLossModel` for the duration of
one model forward with labels. ``FusedHeadMixin`` is the deprecated name of :class:`LinearLossMixin`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.deprecation import deprecated_attribute
from ..base.errors import ConfigError, HeadConfigError
from ..base.loss import FusedLossRecord, HeadLossStats, LossRequest
from ..base.loss_spec import LossSpec, class_weights, reduce_token_loss, target_weights
from ..ops import linear_cross_entropy

__all__ = ["FusedLossConfig", "LossContext", "HeadContractMixin", "LinearLossMixin", "tp_region_input",
           "model_softcap", "detached_alias", "reduced_loss"]


@dataclass
class FusedLossConfig:
    """Options of the fused head + loss."""

    label_smoothing: float = 0.0
    """alpha in [0, 1): label smoothing over the real vocabulary, in ``smoothing_convention``."""
    smoothing_convention: Literal["megatron", "torch"] = "megatron"
    """megatron: eps = alpha V / (V - 1) (Megatron-Core's, 1 - alpha on the label); torch: eps = alpha (torch's,
    Liger-Kernel's, cut-cross-entropy's). See :mod:`megatron_bottleneck.base.loss_spec`."""
    z_loss_weight: float = 0.0
    """w >= 0: adds w lse^2 per token (PaLM's z-loss; Liger's ``lse_square_scale``)."""
    softcap: Optional[float] = None
    """c > 0: final-logit softcapping x = c tanh(z / c) before the loss (Gemma 2/3). None: the model config's
    ``final_logit_softcapping`` (Megatron-Bridge's Gemma providers) when it has one, else no cap."""
    ce_weight: Optional[Tuple[float, ...]] = None
    """Class weights w ``[V]`` (>= 0), torch's / Liger's ``weight`` (None: 1 for every class). The per-token loss
    carries w_y; Megatron's loss function then averages it over the tokens (not over sum w_y)."""
    reduction: Literal["none", "sum", "mean"] = "none"
    """What ``head.loss`` / ``head_loss`` return: "none" the per-token loss ``[s, b]``, "sum", or "mean" (over the
    non-ignored tokens, over sum_t w_{y_t} with ``ce_weight``; the z-loss part over the count), as
    ``linear_cross_entropy``'s. A model takes "none" only: Megatron's loss function reduces the per-token loss
    itself (loss mask, token counts over data / context parallelism)."""
    return_z_loss: bool = False
    """``head.loss`` / ``head_loss`` return (loss, z_loss), the z-loss part reduced like the loss (already inside
    it: for logging). A model takes False only: its forward hands Megatron's loss function one loss tensor."""
    memory_budget_mib: Optional[float] = None
    """Working memory of the chunk loop (the vocabulary chunk is chosen to fit it); None: 16 MiB on CPUs, on GPUs
    1/8 of the free memory rounded down to a power of two, 1 to 4 GiB (``ops.default_memory_budget``)."""
    fp8: Optional[Literal["e4m3"]] = None
    """e4m3: the head's GEMMs in FP8 through ``torch._scaled_mm`` (opt-in; tokens and width multiples of 16)."""
    kernel: Optional[Literal["torch", "triton", "auto"]] = None
    """The vocab loops: ``torch``, ``triton`` (forced), ``auto`` (Triton on CUDA tensors when it imports); None
    (default): the environment variable ``MB_FUSED_KERNEL`` when set (a quick A/B without editing a config),
    else ``torch`` (the default until the Triton kernels' GPU test has passed). A value set here wins over the
    environment."""
    weight_grad_into_main_grad: Optional[bool] = None
    """Add the head weight's float32 gradient straight into Megatron DDP's ``main_grad`` (as Megatron's
    ``gradient_accumulation_fusion`` does for its linear layers) instead of returning it in the weight's dtype.
    None: follow the model config's ``gradient_accumulation_fusion``."""

    def __post_init__(self):
        self.loss_spec()  # every loss option checked here, in one line (ConfigError)
        LossSpec(reduction=self.reduction)
        if not isinstance(self.return_z_loss, bool):
            raise ConfigError(f"return_z_loss must be True or False, got {self.return_z_loss!r}.")

    def check_model_path(self, vocab_size: Optional[int] = None) -> None:
        """Refuse (HeadConfigError, one line) what a model's fused forward cannot honour: a reduction (Megatron's
        loss function reduces the per-token loss with its loss mask), ``return_z_loss`` (the forward returns one
        tensor), class weights without one per real class (``vocab_size``)."""
        if self.reduction != "none":
            raise HeadConfigError(f"reduction={self.reduction!r} in a model: its forward returns the per-token loss, "
                                  f"which Megatron's loss function masks and reduces itself; use reduction='none'")
        if self.return_z_loss:
            raise HeadConfigError("return_z_loss=True in a model: its forward hands Megatron's loss function one "
                                  "loss tensor (the z-loss inside it); call head.loss(...) to get the z-loss apart")
        if vocab_size is not None and self.ce_weight is not None and len(self.ce_weight) != vocab_size:
            raise HeadConfigError(f"ce_weight has {len(self.ce_weight)} class weights, the model's vocabulary "
                                  f"{vocab_size} real classes: give one weight per class")

    def loss_spec(self, logit_scale: float = 1.0, softcap: Optional[float] = None) -> LossSpec:
        """The :class:`~megatron_bottleneck.base.loss_spec.LossSpec` of these options (per-token reduction), with
        MuP's ``logit_scale`` and ``softcap`` when this config sets none (the model config's). Built once per
        (options, logit_scale, softcap) and kept: the class weights reach the GPU once, not every step."""
        key = (self.label_smoothing, self.smoothing_convention, self.z_loss_weight, float(logit_scale),
               self.softcap if self.softcap is not None else softcap, id(self.ce_weight))
        cache = self.__dict__.setdefault("_specs", {})
        if key not in cache:
            cache[key] = LossSpec(label_smoothing=float(self.label_smoothing),
                                  smoothing_convention=self.smoothing_convention,
                                  z_loss_weight=float(self.z_loss_weight), logit_scale=float(logit_scale),
                                  softcap=key[4], ce_weight=None if self.ce_weight is None else tuple(self.ce_weight))
        return cache[key]


def reduced_loss(loss: torch.Tensor, z_loss: torch.Tensor, labels: torch.Tensor, config: FusedLossConfig,
                 vocab_size: int):
    """The per-token loss and z-loss part ``[s, b]`` reduced by ``config.reduction`` (``reduce_token_loss``,
    the op's reductions); (loss, z_loss) with ``config.return_z_loss``, else the loss. On the device."""
    if config.reduction != "none":
        spec = config.loss_spec().with_(reduction=config.reduction)
        y = labels.reshape(-1)
        valid = y != spec.ignore_index
        w = class_weights(spec, vocab_size, loss.device)
        loss, z_loss = reduce_token_loss(loss.reshape(-1), z_loss.reshape(-1), valid, target_weights(w, y, valid),
                                         spec, w is not None)
    return (loss, z_loss) if config.return_z_loss else loss


def model_softcap(config) -> Optional[float]:
    """The final-logit softcap a Megatron / Megatron-Bridge model config carries (``final_logit_softcapping``,
    set by Bridge's Gemma 2 / 3 providers), None when it has none (or 0)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


@dataclass
class LossContext:
    """Set on a head by the fused model for one forward with labels.

    labels: ``[s, b]`` global class ids. config: the fused loss's options. logit_scale: the factor the model
    applies to the logits (MuP's ``mup_output_mult``; 1.0 otherwise), folded into the fused op's input.
    gradient_accumulation_fusion: the model config's flag (the default of ``weight_grad_into_main_grad``).
    output: the loss tensor the head's last call returned (filled by the head), which the model recognises.

    Multi-token prediction: Megatron calls the one head once per MTP depth k = 1..n (``process_mtp_loss``), then
    for the main loss. ``mtp_labels`` holds the labels ``[s, b]`` of the depths still to come (depth k's are the
    labels rolled left k times, as Megatron rolls them); each head call takes the first of them (``labels`` of the
    main call otherwise) and sets ``depth`` (k, 0 for the main head) and ``call_labels`` (the labels it used).
    A depth's output is its per-token loss as ``[s, b, 1]`` (Megatron reads a depth's output as logits).
    """

    labels: torch.Tensor
    config: FusedLossConfig
    logit_scale: float = 1.0
    gradient_accumulation_fusion: bool = False
    output: Optional[torch.Tensor] = field(default=None, repr=False)
    mtp_labels: List[torch.Tensor] = field(default_factory=list, repr=False)
    depth: int = 0
    call_labels: Optional[torch.Tensor] = field(default=None, repr=False)

    def next_call(self) -> torch.Tensor:
        """The labels ``[s, b]`` of the head call now starting (the next MTP depth's, then the main ones)."""
        if self.mtp_labels:
            self.depth = self.depth + 1
            self.call_labels = self.mtp_labels.pop(0)
        else:
            self.depth, self.call_labels = 0, self.labels
        return self.call_labels


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. Megatron's region ops all-reduce
    ``grad.contiguous()`` in place and return ``grad``: for a non-contiguous gradient (e.g. a broadcast one,
    stride 0) the reduced copy would be dropped and each rank keep its partial sum."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def tp_region_input(x: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """x over the full sequence in the TP region: all-gathered under sequence parallelism (backward:
    reduce-scatter), else copied into the region (backward: all-reduce over the vocab shards; the gradient
    made contiguous first, see :class:`_ContiguousGrad`)."""
    if get_pg_size(tp_group) == 1:
        return x
    if sequence_parallel:
        return _ContiguousGrad.apply(gather_from_sequence_parallel_region(x, group=tp_group))
    return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(x, group=tp_group))


def detached_alias(weight: Optional[torch.Tensor], own: Optional[torch.Tensor]) -> bool:
    """Whether ``weight`` is ``own.detach()`` (the same storage, no gradient): what Megatron's ``mtp_detach_heads``
    hands the shared output layer for the MTP depths (``output_layer.weight.detach()``)."""
    return (weight is not None and own is not None and weight is not own and not weight.requires_grad
            and weight.shape == own.shape and weight.data_ptr() == own.data_ptr())


class HeadContractMixin:
    """The head contract's ``forward`` (the loss while a :class:`LossContext` is set, else the logits),
    ``loss_request`` and ``last_loss`` for a head class; the class gives ``logits_forward`` and ``loss`` (see the
    module docstring).

    ``params_detached``: True for the duration of a forward given ``weight=`` a detached alias of the head's own
    ``weight`` (:func:`detached_alias`, Megatron's ``mtp_detach_heads``): the head then reads every parameter
    detached, so that call's loss trains none of them, as the detached weight does for Megatron's dense head."""

    loss_context: Optional[LossContext] = None
    params_detached: bool = False

    def _init_contract(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.loss_request = LossRequest()
        self.last_loss: Optional[FusedLossRecord] = None
        self.loss_context = None

    # the subclass's part ----------------------------------------------------------------------------
    def logits_forward(self, input_, weight=None, runtime_gather_output=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
             config: Optional[FusedLossConfig] = None, stats: Optional[HeadLossStats] = None,
             logit_scale: float = 1.0, weight_grad_into_main_grad: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss_bias(self, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's shard ``[V_local]`` of a bias the head adds to its logits, None when it has none."""
        return None

    def check_loss_spec(self, spec: LossSpec) -> None:
        """Refuse (HeadConfigError, one line) loss options this head cannot honour; every option by default."""

    # the contract ------------------------------------------------------------------------------------
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not detached_alias(weight, getattr(self, "weight", None)):
            return self._contract_forward(input_, weight, runtime_gather_output)
        self.params_detached = True
        try:
            return self._contract_forward(input_, weight, runtime_gather_output)
        finally:
            self.params_detached = False

    def _contract_forward(self, input_, weight, runtime_gather_output):
        ctx = self.loss_context
        labels = None if ctx is None else ctx.next_call()
        if ctx is None:
            return self.logits_forward(input_, weight, runtime_gather_output)
        stats = HeadLossStats() if self.loss_request.record else None
        into_main = ctx.config.weight_grad_into_main_grad
        if into_main is None or self.params_detached:
            into_main = ctx.gradient_accumulation_fusion and not self.params_detached
        loss = self.loss(input_, labels, weight, config=ctx.config, stats=stats, logit_scale=ctx.logit_scale,
                         weight_grad_into_main_grad=bool(into_main))
        ctx.output = loss if ctx.depth == 0 else loss.unsqueeze(-1)  # an MTP depth's: [s, b, 1] (see LossContext)
        return ctx.output, None


class LinearLossMixin(HeadContractMixin):
    """:class:`HeadContractMixin` with the ``loss`` of a head whose logits are z = u F^T, u = ``loss_input(hidden)``
    and F = ``loss_weight(weight)`` (see the module docstring): the logits are never built.

    ``FusedHeadMixin`` (deprecated) is this class."""

    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_mix(self) -> Optional[torch.Tensor]:
        """M with W = F M (``[k, D]``), None when F is W itself."""
        return None

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
             config: Optional[FusedLossConfig] = None, stats: Optional[HeadLossStats] = None,
             logit_scale: float = 1.0, weight_grad_into_main_grad: bool = False) -> torch.Tensor:
        """Per-token cross-entropy ``[s, b]`` of ``logit_scale`` x this head's logits for ``hidden`` ``[s, b, D]``
        (``[s/tp, b, D]`` under sequence parallelism) and ``labels`` ``[s, b]``, never building them.

        u = ``loss_input(hidden)`` (x ``logit_scale``), then :func:`megatron_bottleneck.ops.linear_cross_entropy`
        over F = ``loss_weight(weight)`` in vocab chunks (online log-sum-exp, recomputing backward; max and
        sum-exp all-reduced over TP; rows at global index >= ``vocab_size`` excluded). Gradients reach every
        parameter and ``hidden`` as through the unfused forward + cross-entropy. With ``stats``, the pass is
        kept in ``last_loss`` (per token). ``config.reduction`` / ``config.return_z_loss``: see
        :func:`reduced_loss`. A bias of the head (``loss_bias``) is added to the logits before the cap.
        """
        config = config or FusedLossConfig()
        spec = config.loss_spec(logit_scale)
        if spec.softcap is not None and logit_scale != 1.0:
            raise HeadConfigError(f"final-logit softcapping (softcap={spec.softcap}) with MuP's output multiplier "
                                  f"({logit_scale}) is ambiguous (cap then scale, or scale then cap): turn one off.")
        self.check_loss_spec(spec)
        f = self.loss_weight(weight)
        if f is None:
            raise HeadConfigError("the head has no weight of its own (tied embeddings): pass weight= to loss().")
        u = self.loss_input(hidden)
        if logit_scale != 1.0:
            u = u * logit_scale
        start = get_pg_rank(self.tp_group) * f.shape[0]
        bias = self.loss_bias(weight)
        if bias is not None and logit_scale != 1.0:
            bias = bias * logit_scale  # MuP multiplies the biased logits
        budget = None if config.memory_budget_mib is None else int(config.memory_budget_mib * 2 ** 20)
        loss, zl = linear_cross_entropy(
            u, f, labels, tp_group=self.tp_group, vocab_start=start, vocab_size=self.vocab_size,
            loss_spec=config.loss_spec(1.0), memory_budget_bytes=budget, fp8=config.fp8, stats=stats,
            check_labels=False, kernel=config.kernel, bias=bias, return_z_loss=True,
            weight_grad_into_main_grad=weight_grad_into_main_grad)
        if stats is not None:
            mix = self.loss_mix()
            self.last_loss = FusedLossRecord(loss=loss, stats=stats, input=u.detach(), weight=f.detach(),
                                             mix=None if mix is None else mix.detach(), labels=labels,
                                             vocab_start=start, vocab_size=self.vocab_size,
                                             logit_scale=float(logit_scale),
                                             bias=None if bias is None else bias.detach())  # x logit_scale
        return reduced_loss(loss, zl, labels, config, self.vocab_size)


__getattr__ = deprecated_attribute(__name__, {"FusedHeadMixin": ("megatron_bottleneck.heads.contract.LinearLossMixin",
                                                                 lambda: LinearLossMixin)})
