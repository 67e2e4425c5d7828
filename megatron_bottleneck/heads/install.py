"""Put a :class:`LowRankOutputLayer` into Megatron-Core language models, before DDP wrapping.

Two entry points, one mechanism (:func:`install_low_rank_head`):

* ``install_low_rank_head(model, rank)`` swaps the head of a built GPTModel / HybridModel in place.
* ``low_rank_head_hook(rank)`` returns a pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]``
  for Megatron-LM's ``get_model`` / Megatron-Bridge: it installs the head on every model chunk that
  holds one (the last pipeline stage) and leaves the others alone.

(``megatron_bottleneck.models.build_gpt_model(config, ..., head_rank=r)`` builds a GPTModel with it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Literal, Optional

from megatron.core.distributed import DistributedDataParallel

from ..base.errors import HeadConfigError
from ..base.head import is_lm_head
from .fused import FusedLossConfig, enable_fused_loss
from .low_rank import INIT_METHODS, LowRankOutputLayer, validate_head_shape

__all__ = ["LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook", "require_transformer_engine",
           "require_transformer_engine_for_fp8"]


@dataclass
class LowRankHeadConfig:
    """How to build a low-rank head."""

    rank: int
    """r: W = A B with A (V x r) and B (r x D); 1 <= r <= D."""
    init: Literal["balanced", "orthogonal", "from_dense"] = "balanced"
    """balanced: A, B ~ N(0, sigma/sqrt r); orthogonal: B orthonormal rows; from_dense: best rank-r
    approximation of the model's current head."""
    init_std: Optional[float] = None
    """sigma, the per-entry std of A B; None: ``config.init_method_std``."""
    seed: Optional[int] = None
    """Seed of the (TP-invariant) draws; None: ``torch.initial_seed()``."""
    fused_loss: "bool | FusedLossConfig" = False
    """The model's forward with labels computes the loss fused with the head (no T x V logits)."""


def _unwrap(model):
    if isinstance(model, DistributedDataParallel) or type(model).__name__ in (
        "DistributedDataParallel",
        "FullyShardedDataParallel",
        "TorchFullyShardedDataParallel",
    ):
        raise HeadConfigError(
            "the model is already wrapped in data parallelism: install the low-rank head before DDP "
            "wrapping (use low_rank_head_hook(rank) as Megatron's pre-wrap hook)."
        )
    return getattr(model, "module", model) if type(model).__name__ == "Float16Module" else model


def require_transformer_engine(what: str, error=HeadConfigError) -> None:
    """Raise ``error`` (one line naming ``what``) when NVIDIA Transformer Engine cannot be imported."""
    try:
        import transformer_engine  # noqa: F401  (optional dependency)
    except ImportError:
        raise error(
            f"{what} needs NVIDIA Transformer Engine, which is not installed: "
            "pip install 'megatron-bottleneck[te]' on a CUDA machine, or leave FP8 off."
        ) from None


def require_transformer_engine_for_fp8(config) -> None:
    """FP8 runs through Transformer Engine only: refuse it clearly when TE is not installed."""
    if getattr(config, "fp8", None):
        require_transformer_engine(f"fp8={config.fp8!r}")


def _check_model(model) -> None:
    config = model.config
    require_transformer_engine_for_fp8(config)
    if getattr(model, "share_embeddings_and_output_weights", False):
        raise HeadConfigError(
            "the model ties its input embedding and output weights, so its head cannot be factorised. "
            "Untie them: GPTModel(..., share_embeddings_and_output_weights=False) "
            "(Megatron-LM: --untie-embeddings-and-output-weights; Megatron-Bridge: "
            "share_embeddings_and_output_weights=False in the model provider)."
        )
    if getattr(config, "mtp_num_layers", None):
        raise HeadConfigError(
            f"multi-token prediction (mtp_num_layers={config.mtp_num_layers}) is not supported with a "
            "low-rank head yet: set mtp_num_layers=None."
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise HeadConfigError(
            "defer_embedding_wgrad_compute=True is not supported with a low-rank head (Megatron's "
            "deferred path recomputes a dense output weight gradient): set it to False."
        )


def install_low_rank_head(model, head: "LowRankHeadConfig | int", *, tp_group=None):
    """Replace ``model.output_layer`` by a rank-``head.rank`` :class:`LowRankOutputLayer` in place.

    ``model`` is a Megatron-Core language model (GPTModel, HybridModel) not yet wrapped in DDP.
    Models without a head (not the last pipeline stage) are returned unchanged. With
    ``init='from_dense'`` the new head starts from the best rank-r approximation of the current one.
    Returns the model.
    """
    if isinstance(head, int) and not isinstance(head, bool):
        head = LowRankHeadConfig(rank=head)
    if head.init not in INIT_METHODS:
        raise HeadConfigError(f"init={head.init!r} is not one of {INIT_METHODS}.")
    outer, model = model, _unwrap(model)
    old = getattr(model, "output_layer", None)
    if old is None or not getattr(model, "post_process", True):
        return outer
    if isinstance(old, LowRankOutputLayer):
        raise HeadConfigError("the model already has a LowRankOutputLayer; build a fresh model to change it.")
    _check_model(model)
    if tp_group is None:
        tp_group = getattr(old, "tp_group", None)
    config = model.config
    hidden, vocab = old.input_size, old.output_size
    tp = vocab // old.output_size_per_partition
    validate_head_shape(hidden, vocab, head.rank, tp)
    new = LowRankOutputLayer(
        hidden,
        vocab,
        head.rank,
        config=config,
        init=head.init,
        init_std=head.init_std,
        init_weight=old.weight if head.init == "from_dense" else None,
        seed=head.seed,
        gather_output=old.gather_output,
        tp_group=tp_group,
        device=old.weight.device if old.weight is not None else None,
        real_vocab_size=old.vocab_size if is_lm_head(old) else None,
    )
    model.output_layer = new  # a fused model (FusedLossModel) drives whichever head it holds
    if head.fused_loss:
        enable_fused_loss(model, head.fused_loss if isinstance(head.fused_loss, FusedLossConfig) else None)
    return outer


def low_rank_head_hook(head: "LowRankHeadConfig | int") -> Callable[[List], List]:
    """A pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]`` installing the head."""

    def hook(models: List) -> List:
        return [install_low_rank_head(m, head) for m in models]

    return hook
