"""The shared machinery of the built-in non-linear heads (mixture of softmaxes, pointwise logit maps, stacked).

A head here is written as two functions of a parameter dict p (name -> tensor, as ``named_parameters()``):

* ``replicated_part(p, h) -> (x_1, ...)``: the token-wise work on the head input h ``[..., D]`` done with
  replicated parameters (e.g. h_k = tanh(P_k h), log pi = log_softmax(U h)), each x_i ``[..., *]`` with the
  sequence first;
* ``sharded_part(p, x_1, ...) -> u [..., n_valid]``: this rank's columns of the effective log-probabilities
  u = log p(. | h), from the vocab-sharded weight W (``weight``, ``[V/tp, width]``), normalised over the whole
  vocabulary with :func:`~megatron_bottleneck.base.tp_autograd.tp_log_softmax`; replicated parameters used
  here are named in ``sharded_part_params`` and enter through ``tp_copy``.

Between the two, the x_i enter the TP region: copied (backward: all-reduce of the vocab shards' partial
cotangents), or all-gathered over the sequence under sequence parallelism (backward: reduce-scatter), as
the low-rank head's U. Replicated parameters of ``replicated_part`` then see the local sequence shard under
SP and carry ``sequence_parallel = True`` (Megatron's ``finalize_model_grads`` all-reduces them).

Precision: the GEMMs run in the parameters' dtype; every softmax, log-softmax and exp-sum in float32 for 16-bit
parameters, the cast made before the vocab-parallel max / sum all-reduces (as Megatron's cross-entropy keeps its
softmax in float32), so u is float32 and a 16-bit head's per-token loss is as accurate as Megatron's dense
path's (``tests/unit/test_head_precision.py``).

From these the base class gives: the unfused forward (``logits_forward``: u itself, float32 for 16-bit
parameters, padded rows at the dtype's minimum, so that Megatron's vocab-parallel cross-entropy of it is
-log p(y)), the materialised loss (``loss``:
-log p(y) from u, picked and all-reduced; label smoothing over the real vocabulary; no z-loss, whose lse is 0
for normalised log-probabilities, and no FP8), ``log_prob_fn`` (the general probe's contract,
:class:`~megatron_bottleneck.base.head.HeadLogProb`), TP-invariant initialisation (every full tensor drawn on
the CPU from one generator seeded with ``seed``, W first, each rank keeping its shard) and
``sharded_state_dict`` (W sharded on the vocabulary, the rest replicated: a checkpoint saved at TP=2 loads
at TP=1). A head whose math allows a fused loss overrides ``loss``.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_pg_rank, get_pg_size
from torch.nn import Parameter

from ..base.errors import HeadConfigError
from ..base.groups import default_tp_group
from ..base.head import HeadBuildContext, HeadLogProb
from ..base.loss_spec import LossSpec, log_prob_token_loss
from ..base.tp_autograd import tp_copy, tp_reduce_sum
from .contract import FusedLossConfig, HeadContractMixin, reduced_loss, tp_region_input
from .shards import VocabSharded

__all__ = ["VocabParallelHead", "vocab_parallel_nll"]


def vocab_parallel_nll(u: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int, tp_group,
                       label_smoothing: float = 0.0, ignore_index: int = -100,
                       spec: Optional[LossSpec] = None) -> torch.Tensor:
    """Per-token loss ``[...]`` float32 from this rank's log-probability columns u ``[..., n_valid]`` (global
    rows vocab_start + j; float32 for 16-bit heads, see the module docstring), the one definition of
    :func:`megatron_bottleneck.base.loss_spec.log_prob_token_loss` (sums all-reduced over ``tp_group``):
    (1 - eps) w_y (-log p_y) - (eps / V) sum_i w_i log p_i; 0 where y is ignored. ``spec``: the loss options
    (None: Megatron's smoothing ``label_smoothing`` and ``ignore_index``)."""
    if spec is None:
        spec = LossSpec(ignore_index=ignore_index, label_smoothing=label_smoothing)
    return log_prob_token_loss(u, labels, spec, vocab_start, vocab_size,
                               reduce=functools.partial(tp_reduce_sum, group=tp_group))


class VocabParallelHead(HeadContractMixin, VocabSharded, torch.nn.Module):
    """Base of a vocab-parallel head given by ``replicated_part`` / ``sharded_part`` (see the module docstring).

    Attributes as Megatron's ``ColumnParallelLinear`` head: ``weight`` W ``[V/tp, width]`` (vocab-sharded,
    init N(0, sigma^2), sigma = ``init_std`` or ``config.init_method_std``), ``input_size`` = D
    (= ``head_input_size``), ``output_size`` (padded V), ``output_size_per_partition``, ``gather_output``,
    ``tp_group``, ``sequence_parallel``; ``vocab_size`` the real V.
    """

    sharded_part_params: Tuple[str, ...] = ()

    def __init__(self, ctx: HeadBuildContext, width: int, init_std: Optional[float] = None):
        super().__init__()
        self.tp_group = default_tp_group(ctx.tp_group)
        tp = get_pg_size(self.tp_group)
        if ctx.vocab_size % tp:
            raise HeadConfigError(
                f"vocabulary size {ctx.vocab_size} is not divisible by the tensor-parallel size {tp}: pad it "
                f"(megatron_bottleneck.padded_vocab_size(vocab, tp)).")
        if not 2 <= ctx.real_vocab_size <= ctx.vocab_size:
            raise HeadConfigError(f"real_vocab_size={ctx.real_vocab_size} must be in [2, {ctx.vocab_size}].")
        self.config = ctx.config
        self.input_size = self.head_input_size = int(ctx.hidden_size)
        self.output_size = int(ctx.vocab_size)
        self.output_size_per_partition = self.output_size // tp
        self.width = int(width)
        self.gather_output = bool(ctx.gather_output)
        self.sequence_parallel = bool(getattr(ctx.config, "sequence_parallel", False)) and tp > 1
        device = ctx.device
        if device is None:
            device = "cpu" if getattr(ctx.config, "use_cpu_initialization", True) else torch.cuda.current_device()
        self._device, self._dtype = device, ctx.config.params_dtype
        self.init_std = float(init_std if init_std is not None else getattr(ctx.config, "init_method_std", 0.02))
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(int(ctx.seed if ctx.seed is not None else torch.initial_seed()) % (2**63))
        w_full = self.draw(self.output_size, self.width, std=self.init_std)
        rank, rows = get_pg_rank(self.tp_group), self.output_size_per_partition
        self.weight = Parameter(w_full[rank * rows:(rank + 1) * rows].clone().to(device=device, dtype=self._dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self._tag(self.weight)
        self.register_parameter("bias", None)
        self._init_contract(ctx.real_vocab_size)

    # ------------------------------------------------------------------ init
    def draw(self, *shape: int, std: float) -> torch.Tensor:
        """N(0, std^2) of ``shape`` from the head's generator (call in a fixed order: TP-invariant draws)."""
        return torch.randn(*shape, generator=self._gen, dtype=torch.float32) * std

    def add_replicated(self, name: str, value: torch.Tensor) -> Parameter:
        """Register a parameter replicated over TP (its gradient equal on every rank after Megatron's
        finalize: tagged ``sequence_parallel`` when used before the region under SP)."""
        p = Parameter(value.to(device=self._device, dtype=self._dtype))
        setattr(self, name, p)
        self._tag(p)
        p.sequence_parallel = self.sequence_parallel and name not in self.sharded_part_params
        return p

    @staticmethod
    def _tag(p: Parameter) -> None:
        p.allreduce = True  # data-parallel all-reduce, as Megatron's own head
        p.is_embedding_or_output_parameter = True

    # ---------------------------------------------------------- the subclass's part
    def replicated_part(self, p: Dict[str, torch.Tensor], h: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return (h,)

    def sharded_part(self, p: Dict[str, torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    @property
    def vocab_start(self) -> int:
        return get_pg_rank(self.tp_group) * self.output_size_per_partition

    @property
    def n_valid(self) -> int:
        """Rows of this rank's shard that are real vocabulary."""
        return int(max(0, min(self.output_size_per_partition, self.vocab_size - self.vocab_start)))

    def _params(self, weight: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        p = {n: (q.detach() if self.params_detached else q) for n, q in self.named_parameters()}  # mtp_detach_heads
        if weight is not None:
            p["weight"] = self.supplied_weight(weight)
        return p

    def _sharded(self, p: Dict[str, torch.Tensor], xs) -> torch.Tensor:
        q = dict(p)
        for name in self.sharded_part_params:
            if name in q:
                q[name] = tp_copy(q[name], self.tp_group)
        return self.sharded_part(q, *xs)

    def log_probs(self, hidden: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u ``[s, b, n_valid]`` for hidden ``[s, b, D]`` (``[s/tp, b, D]`` under SP), through the TP region."""
        p = self._params(weight)
        xs = [tp_region_input(x, self.tp_group, self.sequence_parallel) for x in self.replicated_part(p, hidden)]
        return self._sharded(p, xs)

    def logits_forward(self, input_, weight=None, runtime_gather_output=None):
        """The unfused forward: u = log p ``[s, b, V/tp]`` (float32 for 16-bit parameters; padded rows at the
        dtype's minimum), gathered when asked (in float32: cast before the gather). Megatron's cross-entropy of
        u is -log p(y) (u is normalised)."""
        u = self.log_probs(input_, weight)
        pad = self.output_size_per_partition - u.shape[-1]
        if pad:
            u = torch.cat([u, u.new_full(u.shape[:-1] + (pad,), torch.finfo(u.dtype).min)], dim=-1)
        elif u.requires_grad:
            # Megatron's cross-entropy subtracts the max from its input in place, and u itself is saved by the
            # backward of log_softmax / logsumexp: hand it a copy (the padded u above is one already)
            u = u.clone()
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and get_pg_size(self.tp_group) > 1:
            u = gather_from_tensor_model_parallel_region(u, group=self.tp_group)
        return u, None

    def check_loss_options(self, config: FusedLossConfig, logit_scale: float) -> None:
        name = type(self).__name__
        if config.z_loss_weight:
            raise HeadConfigError(f"the {name} head's loss has no z-loss (its log-probabilities are normalised, "
                                  f"lse = 0): set z_loss_weight=0")
        if config.fp8:
            raise HeadConfigError(f"the {name} head has no FP8 loss: leave fp8 off (model.head_fp8=null)")
        if logit_scale != 1.0:
            raise HeadConfigError(f"the {name} head does not take MuP's output multiplier (logit_scale="
                                  f"{logit_scale}): turn use_mup off for it")
        self.check_loss_spec(config.loss_spec(logit_scale))

    def check_loss_spec(self, spec: LossSpec) -> None:
        """Final-logit softcapping caps a linear head's logits; this head's output is normalised log-probabilities
        (the general probe sees log p, not the capped logits): refused in one line (the ``softcap`` head kind
        caps its own logits)."""
        if spec.softcap is not None:
            raise HeadConfigError(f"the {type(self).__name__} head has no final-logit softcapping (softcap="
                                  f"{spec.softcap}): leave softcap unset (a Gemma model: use the dense or low_rank "
                                  f"head), or use the 'softcap' head kind")

    def loss(self, hidden, labels, weight=None, *, config=None, stats=None, logit_scale=1.0,
             weight_grad_into_main_grad=False):
        """Materialised: -log p(y) ``[s, b]`` float32 from u ``[s, b, V/tp]`` (this head has no fused loss)."""
        config = config or FusedLossConfig()
        self.check_loss_options(config, logit_scale)
        loss = vocab_parallel_nll(self.log_probs(hidden, weight), labels, self.vocab_start, self.vocab_size,
                                  self.tp_group, spec=config.loss_spec())
        return reduced_loss(loss, torch.zeros_like(loss), labels, config, self.vocab_size)

    def log_prob_fn(self) -> HeadLogProb:
        """The general probe's view (:class:`~megatron_bottleneck.base.head.HeadLogProb`): fn(p, h [T, D]) =
        sharded_part(p, tp_copy(replicated_part(p, h)))."""

        def fn(p: Dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
            xs = [tp_copy(x, self.tp_group) for x in self.replicated_part(p, h)]
            return self._sharded(p, xs)

        return HeadLogProb(fn=fn, params={n: q.detach() for n, q in self.named_parameters()},
                           sharded=frozenset({"weight"}), vocab_start=self.vocab_start, vocab_size=self.vocab_size,
                           n_valid=self.n_valid, tp_group=self.tp_group)

    def weight_rows(self, p: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The real rows of this rank's W shard, ``[n_valid, width]``."""
        return p["weight"][: self.n_valid]

    def extra_repr(self) -> str:
        tp = self.output_size // self.output_size_per_partition
        return (f"in_features={self.input_size}, width={self.width}, out_features={self.output_size}, TP={tp}, "
                f"sequence_parallel={self.sequence_parallel}")
