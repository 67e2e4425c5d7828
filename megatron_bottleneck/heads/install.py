"""Put a registered head (:class:`~megatron_bottleneck.base.head.HeadConfig`) into Megatron-Core language models,
before DDP wrapping.

Two entry points, one mechanism (:func:`install_head`):

* ``install_head(model, HeadConfig("mos", {"k": 4}))`` swaps the head of a built GPTModel / HybridModel in
  place: the kind's builder gets a :class:`~megatron_bottleneck.base.head.HeadBuildContext` from the current
  head (shapes, TP group, gather_output) and the result is checked against the head contract.
* ``head_hook(HeadConfig(...))`` returns a pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]``
  for Megatron-LM's ``get_model`` (core_v0.19: the config container's model) / Megatron-Bridge
  (``config.model.register_pre_wrap_hook``): it installs the head on every model chunk that holds one (the
  last pipeline stage) and leaves the others alone.

``install_low_rank_head(model, rank)`` / ``low_rank_head_hook(rank)`` are the same for the ``low_rank`` kind.
(``megatron_bottleneck.models.build_gpt_model(config, ..., head=HeadConfig(...))`` builds a GPTModel with it,
``build_hybrid_model`` a HybridModel.) The new head's parameters carry the replaced dense weight's Megatron tags
(:func:`copy_output_tags`).

Multi-token prediction: the MTP depths call ``model.output_layer`` (Megatron shares the output layer across
depths), so the installed head is shared by every depth as Megatron's dense head is; Megatron's
``mtp_detach_heads`` (megatron-core >= 0.19) hands it ``output_layer.weight.detach()``, upon which every head reads
all its parameters detached (``HeadContractMixin.params_detached``): the MTP losses train none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Literal, Optional

from megatron.core.distributed import DistributedDataParallel

from ..base.errors import HeadConfigError
from ..base.head import HeadBuildContext, HeadConfig, check_head, get_head_spec, is_lm_head
from .model_loss import FusedLossConfig, as_lm_head, enable_fused_loss
from .low_rank import INIT_METHODS

__all__ = ["LowRankHeadConfig", "install_low_rank_head", "low_rank_head_hook", "install_head", "head_hook",
           "as_head_config", "require_transformer_engine", "require_transformer_engine_for_fp8",
           "refuse_from_dense_before_load"]


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
            "the model is already wrapped in data parallelism: install the head before DDP "
            "wrapping (use head_hook(...) or low_rank_head_hook(rank) as Megatron's pre-wrap hook)."
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


def _check_model(model, what: str = "a low-rank head") -> None:
    config = model.config
    require_transformer_engine_for_fp8(config)
    if getattr(model, "share_embeddings_and_output_weights", False):
        raise HeadConfigError(
            "the model ties its input embedding and output weights, so its head cannot be factorised. "
            "Untie them: GPTModel(..., share_embeddings_and_output_weights=False) "
            "(Megatron-LM: --untie-embeddings-and-output-weights; Megatron-Bridge: "
            "share_embeddings_and_output_weights=False in the model provider)."
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise HeadConfigError(
            f"defer_embedding_wgrad_compute=True is not supported with {what} (Megatron's "
            "deferred path recomputes a dense output weight gradient): set it to False."
        )


def as_head_config(head) -> HeadConfig:
    """A :class:`HeadConfig` from a HeadConfig, a ``"kind:k=v"`` string, a :class:`LowRankHeadConfig` or a rank."""
    if isinstance(head, HeadConfig):
        return head
    if isinstance(head, str):
        return HeadConfig.parse(head)
    if isinstance(head, int) and not isinstance(head, bool):
        head = LowRankHeadConfig(rank=head)
    if isinstance(head, LowRankHeadConfig):
        opts = {"r": head.rank, "init": head.init}
        if head.init_std is not None:
            opts["init_std"] = head.init_std
        return HeadConfig("low_rank", opts, seed=head.seed)
    raise HeadConfigError(f"a head is a HeadConfig, a 'kind:name=value' string or a rank, got {head!r}")


def refuse_from_dense_before_load(head, where: str, error=HeadConfigError, note: str = "") -> None:
    """One ``error`` line when ``head`` (anything :func:`as_head_config` takes) is a ``low_rank`` head with
    ``init=from_dense`` and ``where`` (a model builder, a provider or pre-wrap hook) installs it on a freshly built
    model: those run before a checkpoint loads, so from_dense would factorise the random initialisation. A
    trained dense head is factorised by ``megatron-bottleneck convert-head`` (or ``install_low_rank_head`` on a
    model whose weights are loaded). ``note`` ends the line (what applies where)."""
    if head is None:
        return
    head = as_head_config(head)
    if head.kind == "low_rank" and str(head.options.get("init", "balanced")) == "from_dense":
        raise error(f"{where}: low_rank init=from_dense would factorise the randomly initialised head (it runs before "
                    "a checkpoint loads): train with the dense head, then run `megatron-bottleneck convert-head "
                    f"CHECKPOINT --head low_rank:r=R --out DIR` and resume from DIR{note}")


def install_head(model, head: "HeadConfig | str", *, tp_group=None, fused_loss: "bool | FusedLossConfig" = False):
    """Replace ``model.output_layer`` by the head ``head`` names (a :class:`HeadConfig` or ``"kind:k=v,..."``)
    in place; returns the model.

    ``model``: a Megatron-Core language model (GPTModel, HybridModel) not yet wrapped in DDP; a model without a
    head (not the last pipeline stage) is returned unchanged. ``dense`` keeps the model's own head (given the
    head contract, :func:`~megatron_bottleneck.heads.as_lm_head`); any other kind is built by its registered
    builder from the current head's shapes (``head.seed``: the TP-invariant draws' seed), checked
    (:func:`~megatron_bottleneck.base.head.check_head`) and installed. Needs untied embeddings. ``fused_loss``:
    the model's forward with labels computes the loss with the head (fused where the head allows it).
    """
    head = as_head_config(head)
    spec = get_head_spec(head.kind)
    options = spec.make_options(head.options)
    outer, model = model, _unwrap(model)
    old = getattr(model, "output_layer", None)
    if old is None or not getattr(model, "post_process", True):
        return outer
    if head.kind == "dense":
        as_lm_head(old)
    else:
        if is_lm_head(old) and type(old).__name__ != "DenseOutputLayer":
            raise HeadConfigError(f"the model already has a {type(old).__name__}; build a fresh model to change it.")
        _check_model(model, f"a {head.kind} head")
        ctx = HeadBuildContext(
            hidden_size=old.input_size, vocab_size=old.output_size,
            real_vocab_size=old.vocab_size if is_lm_head(old) else old.output_size, config=model.config,
            tp_group=tp_group if tp_group is not None else getattr(old, "tp_group", None), seed=head.seed,
            device=old.weight.device if getattr(old, "weight", None) is not None else None,
            gather_output=bool(getattr(old, "gather_output", False)), old_head=old)
        model.output_layer = check_head(spec.builder(ctx, options), head.kind)
        copy_output_tags(old, model.output_layer)
    if fused_loss:
        enable_fused_loss(model, fused_loss if isinstance(fused_loss, FusedLossConfig) else None)
    return outer


OUTPUT_TAGS = ("is_embedding_or_output_parameter", "is_embedding_parameter")
"""Megatron's parameter tags on the dense output weight (``LanguageModule.setup_embeddings_and_output_layer``):
decoupled learning rate and Muon exclusion (``is_embedding_or_output_parameter``), MuP's embedding-class grouping
(``is_embedding_parameter``, megatron-core >= 0.19 with ``use_mup``)."""


def copy_output_tags(old, new) -> None:
    """Every parameter of the head ``new`` carries the tags of :data:`OUTPUT_TAGS` that the replaced dense head's
    weight carries, so Megatron's optimizer groups (decoupled LR, MuP, Muon) put each of them where they put the
    dense output weight. (``sequence_parallel`` is the head's own: set on its replicated parameters under SP.)"""
    weight = getattr(old, "weight", None)
    tags = {t: getattr(weight, t) for t in OUTPUT_TAGS if getattr(weight, t, None) is not None}
    for p in new.parameters():
        for tag, value in tags.items():
            setattr(p, tag, value)


def head_hook(head: "HeadConfig | str", *, fused_loss: "bool | FusedLossConfig" = False) -> Callable[[List], List]:
    """A pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]`` installing ``head`` (:func:`install_head`)
    on every chunk that holds the head: Megatron-LM core_v0.19 (``get_model``'s pre-wrap hooks) and
    Megatron-Bridge (``config.model.register_pre_wrap_hook(mb.head_hook("mos:k=4"))``)."""
    head = as_head_config(head)
    get_head_spec(head.kind).make_options(head.options)  # refused now, not in the hook
    refuse_from_dense_before_load(head, "head_hook (a pre-wrap hook)")

    def hook(models: List) -> List:
        return [install_head(m, head, fused_loss=fused_loss) for m in models]

    return hook


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
    return install_head(model, as_head_config(head), tp_group=tp_group, fused_loss=head.fused_loss)


def low_rank_head_hook(head: "LowRankHeadConfig | int") -> Callable[[List], List]:
    """A pre-wrap hook ``(list[MegatronModule]) -> list[MegatronModule]`` installing the head (``init='from_dense'``
    refused: the hook runs before the checkpoint loads)."""
    refuse_from_dense_before_load(LowRankHeadConfig(rank=head) if isinstance(head, int) else head,
                                  "low_rank_head_hook (a pre-wrap hook)")

    def hook(models: List) -> List:
        return [install_low_rank_head(m, head) for m in models]

    return hook
