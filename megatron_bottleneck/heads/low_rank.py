"""A rank-r LM head for Megatron-Core, vocab-parallel: W = A B.

Shapes and names (V vocab, padded by Megatron to a multiple of the TP size; D hidden; r rank):

* ``weight`` = A, ``(V / tp) x r``: sharded over the vocabulary like Megatron's output-layer weight,
  so every code path that reads ``output_layer.weight`` (checkpoint shape-mismatch handling, the
  embedding/output tag, decoupled learning rates) sees the vocab-sharded factor.
* ``input_proj`` = B, ``r x D``: replicated over TP ranks; its gradient is identical on every rank.

Forward on hidden states H (``[s, b, D]``; ``[s / tp, b, D]`` under sequence parallelism)::

    U = H B^T                      # [s, b, r]     (under SP: on the local sequence shard)
    U <- all-gather(U) over TP     # SP only: gathers s x b x r instead of s x b x D
    logits = U A_local^T           # [s, b, V / tp], vocab-sharded

Backward: dL/dU is a sum over vocab shards, so it is all-reduced over TP (reduce-scattered under
SP). Without SP, dL/dB = dU^T H is then identical on every rank; under SP each rank holds the part of
dL/dB from its sequence shard, and ``input_proj.sequence_parallel = True`` makes Megatron's
``finalize_model_grads`` all-reduce it over TP (exactly as for layer-norm weights).

Initialisation (``init``), with sigma the dense head's init std (``config.init_method_std``):

* ``"balanced"`` (default): A, B ~ N(0, sigma / sqrt(r)) entry-wise, so (A B)_ij has variance
  r (sigma / sqrt r)^2 = sigma^2: the per-entry std of the dense head.
* ``"orthogonal"``: B has orthonormal rows, A ~ N(0, sigma^2 D / r); E[(A B)_ij^2] = sigma^2.
* ``"from_dense"``: from a dense weight W (``init_weight``): B = V_r^T, A = W V_r with V_r the top-r
  right singular vectors of W (eigenvectors of W^T W, a D x D all-reduce: :func:`dense_gram`, streamed over
  the shard's rows), the best rank-r approximation (Eckart-Young). For r == D, A = W and B = I exactly.
  It factorises the weights the head holds when it is built: a trained head (``install_low_rank_head`` on a
  loaded model, ``megatron-bottleneck convert-head``); builders and pre-wrap hooks, which run before a
  checkpoint loads, refuse it (:func:`~megatron_bottleneck.heads.install.refuse_from_dense_before_load`).

Draws are TP-invariant: the full A is drawn on CPU from a generator seeded with ``seed`` and each
rank keeps its shard, so a model has the same head at every TP size.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_pg_rank, get_pg_size
from torch.nn import Parameter

from ..base.device import communicator_device
from ..base.errors import HeadConfigError
from ..base.groups import default_tp_group
from ..base.head import HeadView
from .contract import LinearLossMixin, tp_region_input
from .shards import VocabSharded

INIT_METHODS = ("balanced", "orthogonal", "from_dense")
ROW_BLOCK = 8192
"""Rows of a dense shard converted to float64 at a time by :func:`dense_gram` and ``from_dense``."""


class LowRankOutputLayer(LinearLossMixin, VocabSharded, torch.nn.Module):
    """Drop-in replacement for ``GPTModel.output_layer`` with W = A B of rank ``rank``.

    Contract of Megatron's ``ColumnParallelLinear`` head: ``forward(input_, weight=None,
    runtime_gather_output=None) -> (logits, None)``, logits vocab-sharded ``[s, b, V/tp]`` unless
    gathered (``gather_output`` or ``runtime_gather_output=True``). ``weight`` overrides A. Implements
    :class:`~megatron_bottleneck.base.head.LMHead` (fused loss over U = H B^T and A's shard, probe view
    F = A, M = B); ``real_vocab_size``: the tokenizer's vocabulary before Megatron's padding (default
    ``vocab_size``), the head's ``vocab_size`` attribute.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        rank: int,
        *,
        config,
        init: str = "balanced",
        init_std: Optional[float] = None,
        init_weight: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        gather_output: bool = False,
        tp_group=None,
        device=None,
        real_vocab_size: Optional[int] = None,
    ):
        super().__init__()
        self.tp_group = default_tp_group(tp_group)
        tp = get_pg_size(self.tp_group)
        validate_head_shape(hidden_size, vocab_size, rank, tp)
        if init not in INIT_METHODS:
            raise HeadConfigError(f"init={init!r} is not one of {INIT_METHODS}.")
        if init == "from_dense" and init_weight is None:
            raise HeadConfigError("init='from_dense' needs init_weight (the local dense shard).")

        self.config = config
        self.input_size = hidden_size
        self.output_size = vocab_size
        self.rank = rank
        self.output_size_per_partition = vocab_size // tp
        self.gather_output = gather_output
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False)) and tp > 1
        if device is None:
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype

        a, b = self._initial_factors(init, init_std, init_weight, seed, tp)
        self.weight = Parameter(a.to(device=device, dtype=dtype))
        self.input_proj = Parameter(b.to(device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self._tag_parameters()
        if real_vocab_size is not None and not 2 <= real_vocab_size <= vocab_size:
            raise HeadConfigError(f"real_vocab_size={real_vocab_size} must be in [2, {vocab_size}] (the padded size).")
        self._init_contract(vocab_size if real_vocab_size is None else real_vocab_size)

    # ------------------------------------------------------------------ init
    def _initial_factors(self, init, init_std, init_weight, seed, tp) -> Tuple[torch.Tensor, ...]:
        r, d, v = self.rank, self.input_size, self.output_size
        if init == "from_dense":
            return self._factors_from_dense(init_weight.detach())
        sigma = init_std if init_std is not None else getattr(self.config, "init_method_std", 0.02)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed if seed is not None else torch.initial_seed()) % (2**63))
        if init == "balanced":
            std = math.sqrt(sigma / math.sqrt(r))
            b = torch.randn(r, d, generator=gen, dtype=torch.float32) * std
            a_full = torch.randn(v, r, generator=gen, dtype=torch.float32) * std
        else:  # orthogonal
            q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
            b = q.t().contiguous().float()
            a_full = torch.randn(v, r, generator=gen, dtype=torch.float32) * (sigma * math.sqrt(d / r))
        rank_in_tp = get_pg_rank(self.tp_group)
        rows = self.output_size_per_partition
        a = a_full[rank_in_tp * rows : (rank_in_tp + 1) * rows].clone()
        return a, b

    def _factors_from_dense(self, w_local: torch.Tensor):
        if tuple(w_local.shape) != (self.output_size_per_partition, self.input_size):
            raise HeadConfigError(
                f"init_weight has shape {tuple(w_local.shape)}, expected the local dense shard "
                f"({self.output_size_per_partition}, {self.input_size})."
            )
        if self.rank == self.input_size:
            return w_local.float().cpu(), torch.eye(self.input_size, dtype=torch.float32)
        v_r = top_right_singular_vectors(w_local, self.rank, self.tp_group)  # D x r, float64
        a = torch.cat([(blk.double() @ v_r).float().cpu() for blk in w_local.split(ROW_BLOCK)])
        return a, v_r.t().contiguous().float().cpu()

    def _tag_parameters(self) -> None:
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        for p in (self.weight, self.input_proj):
            p.allreduce = True  # data-parallel all-reduce, as Megatron's own head
            p.is_embedding_or_output_parameter = True
        # Under SP each rank computes dL/dB from its sequence shard: finalize_model_grads sums them.
        self.input_proj.sequence_parallel = self.sequence_parallel

    # --------------------------------------------------------------- forward
    def logits_forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, None]:
        """The unfused forward: logits ``[s, b, V/tp]`` = U A_local^T (gathered when asked)."""
        weight = self.supplied_weight(weight)  # A, (V/tp) x r
        logits = torch.matmul(self.project(input_), weight.t())  # [s, b, V/tp]
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and get_pg_size(self.tp_group) > 1:
            logits = gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits, None

    def project(self, input_: torch.Tensor) -> torch.Tensor:
        """U = H B^T, ``[s, b, r]`` over the full sequence, in the TP region: under sequence parallelism B
        is applied to the local shard ``[s/tp, b, D]`` and U all-gathered (backward: reduce-scatter); else
        U is copied into the region (backward: all-reduce of dL/dU over the vocab shards)."""
        b = self.input_proj.detach() if self.params_detached else self.input_proj  # mtp_detach_heads
        projected = torch.matmul(input_, b.t())  # [s(/tp), b, r]
        return tp_region_input(projected, self.tp_group, self.sequence_parallel)

    # the fused loss's part of the head contract (LinearLossMixin)
    def loss_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)

    def loss_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        return self.supplied_weight(weight)

    def loss_mix(self) -> torch.Tensor:
        return self.input_proj

    # ------------------------------------------------------------ checkpoint
    def probe_view(self, weight: Optional[torch.Tensor] = None) -> HeadView:
        """For the gradient probe: col(W) = col(A) (B has full rank r), W = A B."""
        a = (self.weight if weight is None else weight).detach()
        return HeadView(
            factor=a,
            mix=self.input_proj.detach(),
            vocab_start=get_pg_rank(self.tp_group) * self.output_size_per_partition,
            vocab_size=self.vocab_size,
        )

    def dense_weight(self) -> torch.Tensor:
        """The local shard of W = A B, ``(V/tp) x D`` (materialised: for tests and analysis)."""
        return self.weight @ self.input_proj

    def extra_repr(self) -> str:
        tp = self.output_size // self.output_size_per_partition
        return (
            f"in_features={self.input_size}, out_features={self.output_size}, rank={self.rank}, "
            f"TP={tp}, sequence_parallel={self.sequence_parallel}"
        )


def dense_gram(w_local: torch.Tensor, tp_group=None) -> torch.Tensor:
    """G = W^T W, ``D x D`` float64 on ``w_local``'s device, of the dense head W whose vocabulary shard
    ``w_local`` (``(V/tp) x D``) this rank holds: the shard's rows are read ``ROW_BLOCK`` at a time (no float64
    copy of the shard), G_local = sum_blocks W_blk^T W_blk, then all-reduced over ``tp_group`` (sum over the
    vocab shards) on the communicator's device (:func:`~megatron_bottleneck.base.device.communicator_device`:
    a CPU Gram, as ``use_cpu_initialization`` builds it, goes to the GPU for NCCL and comes back)."""
    d = w_local.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=w_local.device)
    for blk in w_local.detach().split(ROW_BLOCK):
        blk = blk.double()
        gram.addmm_(blk.t(), blk)
    if get_pg_size(tp_group) > 1:
        on_comm = gram.to(communicator_device(tp_group, gram.device))
        dist.all_reduce(on_comm, group=tp_group)
        gram = on_comm.to(gram.device)
    return gram


def top_right_singular_vectors(w_local: torch.Tensor, rank: int, tp_group=None) -> torch.Tensor:
    """V_r, ``D x r`` float64: the top-``rank`` right singular vectors of the vocab-sharded W (eigenvectors of
    :func:`dense_gram`'s W^T W, largest eigenvalue first), the same on every TP rank. W V_r V_r^T is the best
    rank-r approximation of W (Eckart-Young)."""
    _, vecs = torch.linalg.eigh(dense_gram(w_local, tp_group))  # ascending
    return vecs[:, -rank:].flip(-1)


def validate_head_shape(hidden_size: int, vocab_size: int, rank: int, tp_size: int) -> None:
    """Raise :class:`HeadConfigError` for a rank or vocabulary that cannot form a head."""
    if not isinstance(rank, int) or rank < 1:
        raise HeadConfigError(f"head rank must be an integer >= 1, got {rank!r}.")
    if rank > hidden_size:
        raise HeadConfigError(
            f"head rank {rank} exceeds the hidden size {hidden_size}: W = A B with B of shape "
            f"(r x {hidden_size}) has rank at most {hidden_size}. Use rank <= {hidden_size} "
            f"(rank == hidden size is a full-rank factorised head)."
        )
    if vocab_size % tp_size:
        raise HeadConfigError(
            f"vocabulary size {vocab_size} is not divisible by the tensor-parallel size {tp_size}. "
            f"Pad the vocabulary to a multiple of it (Megatron-LM: --make-vocab-size-divisible-by; "
            f"megatron_bottleneck.padded_vocab_size(vocab, tp))."
        )
