"""A Megatron-LM ``torch_dist`` checkpoint as ``measure`` sees it: the architecture from its saved arguments.

A checkpoint saved by Megatron-LM's ``pretrain_gpt.py`` (``--ckpt-format torch_dist``) is a directory with
``latest_checkpointed_iteration.txt`` and ``iter_XXXXXXX/`` (``metadata.json``, ``*.distcp``, and ``common.pt``
up to megatron-core 0.16; from 0.19 the common state is an object inside the ``.distcp`` files). The common
state holds the run's ``args`` (an ``argparse.Namespace``; it unpickles with megatron-core alone,
``megatron.training`` is not needed). From them:

* the Megatron-Core ``GPTModel`` they describe, at this job's layout (TP = PP = 1; torch_dist reshards a
  checkpoint saved at any TP / PP), built by :func:`megatron_bottleneck.models.build_gpt_model` with Megatron-
  Core's local layer spec (``get_gpt_layer_local_spec``, as ``pretrain_gpt.py --transformer-impl local``
  builds it): a ``transformer_engine`` checkpoint loads into it too, the local spec naming its layer norms as
  the TE layers do; keys it lacks are one line. Our head when the args name one (``--lm-head-rank`` /
  ``--lm-head-type``, from :mod:`megatron_bottleneck.megatron_lm`), tied or untied embeddings
  (``--untie-embeddings-and-output-weights``), vocabulary ``args.padded_vocab_size``;
* the weights through megatron-core's ``dist_checkpointing.load`` (strict on the model's keys: a missing
  one is an error; the optimizer and RNG state are not read), in eval mode;
* the tokenizer (``args.tokenizer_type``): ``HuggingFaceTokenizer`` (``args.tokenizer_model``) and
  ``GPT2BPETokenizer`` (``args.vocab_file`` / ``args.merge_file``) through ``transformers``,
  ``GPTSentencePieceTokenizer`` / ``SentencePieceTokenizer`` through ``sentencepiece``, ``NullTokenizer``
  (token ids only). The real vocabulary V is the tokenizer's (``NullTokenizer``: ``args.vocab_size + 1``,
  its EOD id being ``vocab_size``); rows V .. padded_vocab_size - 1 are Megatron's padding, left out of every
  figure (the head view's ``vocab_size``, :meth:`~megatron_bottleneck.base.head.HeadView.valid_rows`). When no
  tokenizer loads, V is ``args.vocab_size`` if the run gave it, else the padded size (said in one warning).

A checkpoint of Megatron-LM's ``pretrain_hybrid.py`` (core_v0.19, its args have ``hybrid_layer_pattern``) is a
Megatron-Core ``HybridModel``: built by :func:`megatron_bottleneck.models.build_hybrid_model` with the local hybrid
stack spec (attention ``*`` and MLP ``-`` layers; ``|`` pipeline stages dropped, the layers being numbered across
stages), from checkpoints saved with that spec (``--spec megatron_bottleneck.models.hybrid
LOCAL_HYBRID_STACK_SPEC``, what the runner picks on CPU) or with Megatron's Transformer Engine ``hybrid_stack_spec``
(the same names). Other layers (Mamba ``M``, MoE ``E``, MLA ``+``, ...), multi-token prediction (``/``) and other
specs are refused in one line naming the argument.

What the local GPT model does not build is refused in one line naming the argument: MoE (``num_experts``),
MLA (``multi_latent_attention``), multi-token prediction, custom / heterogeneous / experimental layer specs,
legacy models, sliding-window attention, and the like (:data:`UNSUPPORTED`).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import shutil
import sys
import tempfile
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.activations import squared_relu
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from ..base.errors import CheckpointError, ConfigError
from ..heads.install import LowRankHeadConfig
from ..integrations.megatron_lm import LOCAL_HYBRID_SPEC, MEGATRON_HYBRID_SPECS, head_config_from_args
from ..models.gpt import build_gpt_model
from ..models.hybrid import build_hybrid_model, require_hybrid_model
from .common import import_transformers, no_tokenizer

__all__ = ["read_megatron_lm_args", "read_megatron_lm_common_state", "resolve_megatron_lm_checkpoint",
           "build_megatron_lm_model", "load_megatron_lm_weights", "megatron_lm_tokenizer", "check_supported",
           "check_megatron_lm_checkpoint", "hybrid_pattern", "UNSUPPORTED"]

# (argument, what it is): refused when the saved value is truthy
UNSUPPORTED = (
    ("num_experts", "mixture of experts"),
    ("multi_latent_attention", "multi-latent attention"),
    ("mtp_num_layers", "multi-token prediction"),
    ("experimental_attention_variant", "an experimental attention variant"),
    ("heterogeneous_layers_config_path", "heterogeneous layers"),
    ("spec", "a custom layer spec"),
    ("use_legacy_models", "a legacy (megatron.legacy) model"),
    ("yaml_cfg", "a YAML model config"),
    ("window_size", "sliding-window attention"),
    ("is_hybrid_model", "a hybrid (Mamba) model"),
    ("hybrid_override_pattern", "a hybrid (Mamba) model"),
    ("qk_l2_norm", "L2-normalised queries and keys"),
    ("quick_geglu", "the quick-GeGLU activation"),
    ("use_kitchen", "a Kitchen quantisation recipe"),
    ("fp8_param_gather", "FP8 parameters"),
    ("retro_project_dir", "a Retro model"),
)

# TransformerConfig fields that are the architecture, copied from the args when both have them
_ARCH = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels", "layernorm_epsilon",
         "add_bias_linear", "add_qkv_bias", "qk_layernorm", "normalization", "attention_softmax_in_fp32",
         "apply_query_key_layer_scaling", "apply_residual_connection_post_layernorm", "rotary_interleaved",
         "fp32_residual_connection", "softmax_scale", "init_method_std")


def _is_iteration(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("metadata.json", "common.pt"))


def resolve_megatron_lm_checkpoint(path: str) -> str:
    """The ``iter_*`` directory of a Megatron-LM checkpoint: ``path`` itself when it is one (``metadata.json``
    of a torch_dist save), else the iteration ``latest_checkpointed_iteration.txt`` names (``release``:
    ``path/release``)."""
    if _is_iteration(path):
        return path
    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    try:
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise CheckpointError(f"{path}: not a Megatron-LM checkpoint ({tracker}: {exc.strerror})") from None
    sub = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
    if sub is None:
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    it = os.path.join(path, sub)
    if not _is_iteration(it):
        legacy = os.path.isdir(it) and any(n.startswith("mp_rank_") for n in os.listdir(it))
        raise CheckpointError(f"{it}: " + ("a legacy --ckpt-format torch checkpoint (mp_rank_*/); measure reads "
                                            "torch_dist checkpoints: convert it with Megatron-LM's "
                                            "--ckpt-convert-format torch_dist" if legacy else
                                            "no metadata.json: not a torch_dist checkpoint directory"))
    return it


def _common_state(iter_dir: str):
    """The checkpoint's common (non-sharded) state: ``common.pt`` (megatron-core <= 0.16) or the ``common_state``
    object inside the torch_dist files (0.19), unpickled in full (``weights_only=False``: it holds the args
    namespace, which megatron-core's own reader leaves to Megatron-LM's registered safe globals)."""
    legacy = os.path.join(iter_dir, "common.pt")
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=False)
    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    state = {key: io.BytesIO()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(iter_dir), no_dist=True)
    obj = state[key]
    if isinstance(obj, io.BytesIO):
        obj.seek(0)
        obj = torch.load(obj, map_location="cpu", weights_only=False)
    return obj[0] if isinstance(obj, (list, tuple)) else obj


def read_megatron_lm_common_state(iter_dir: str) -> dict:
    """The checkpoint's whole common state (``args``, ``iteration``, ``opt_param_scheduler``, ...; see
    :func:`_common_state`); a file that does not load, or no saved ``args``, is one line."""
    try:
        common = _common_state(iter_dir)
    except Exception as exc:  # noqa: BLE001 (a missing file, a truncated pickle, a class that does not import)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{iter_dir}: its common state (the saved args) does not load "
                              f"({type(exc).__name__}: {first})") from None
    if not isinstance(common, dict) or common.get("args") is None:
        raise CheckpointError(f"{iter_dir}: no saved 'args' in its common state (save with Megatron-LM's "
                              "pretrain_gpt.py)")
    return common


def read_megatron_lm_args(iter_dir: str):
    """The ``args`` namespace saved in the checkpoint's common state (see :func:`_common_state`)."""
    return read_megatron_lm_common_state(iter_dir)["args"]


_HYBRID_LAYERS = {"M": "Mamba", "G": "gated delta net", "D": "DeepSeek sparse attention", "+": "multi-latent attention",
                  "E": "mixture-of-experts"}
# what a hybrid run's args may hold that a GPT checkpoint may not (the pattern and spec are checked on their own)
_HYBRID_ARGS = ("spec", "is_hybrid_model", "hybrid_override_pattern")


def hybrid_pattern(args) -> Optional[str]:
    """The saved hybrid layer pattern (``hybrid_layer_pattern``, else the older ``hybrid_override_pattern``): a
    ``HybridModel`` checkpoint; None for a GPT one."""
    return getattr(args, "hybrid_layer_pattern", None) or getattr(args, "hybrid_override_pattern", None)


def _check_hybrid(args, pattern: str, name: str) -> None:
    """The layer pattern and ``--spec`` of a HybridModel checkpoint: attention / MLP layers of the local or TE spec."""
    arg = "--hybrid-layer-pattern" if getattr(args, "hybrid_layer_pattern", None) else "--hybrid-override-pattern"
    other = sorted(set(pattern) - set("*-|/"))
    if other:
        kinds = ", ".join(f"{_HYBRID_LAYERS.get(c, 'unknown')} {c!r}" for c in other)
        raise CheckpointError(f"{name}: saved with {arg} {pattern!r} ({kinds} layers): measure builds hybrid models of "
                              "attention '*' and MLP '-' layers; convert it to HuggingFace (Megatron-Bridge) and "
                              "measure that")
    if "/" in pattern:
        raise CheckpointError(f"{name}: saved with {arg} {pattern!r} (multi-token prediction depths '/'): measure "
                              "builds hybrid models of attention '*' and MLP '-' layers without MTP")
    spec = tuple(args.spec) if getattr(args, "spec", None) else None
    if spec not in (None, LOCAL_HYBRID_SPEC, *MEGATRON_HYBRID_SPECS):
        raise CheckpointError(f"{name}: saved with --spec {' '.join(spec)} (a custom hybrid stack spec): measure "
                              f"builds the layers of --spec {' '.join(LOCAL_HYBRID_SPEC)} and of Megatron's "
                              f"{' '.join(MEGATRON_HYBRID_SPECS[0])}")
    try:
        require_hybrid_model()
    except ConfigError as exc:
        raise CheckpointError(f"{name}: saved with {arg} {pattern!r} (a HybridModel): {exc}") from None


def check_supported(args, name: str) -> None:
    """One line naming the first saved argument the local GPT (or attention / MLP hybrid) model does not build (see
    :data:`UNSUPPORTED`)."""
    pattern = hybrid_pattern(args)
    if pattern:
        _check_hybrid(args, pattern, name)
    for arg, what in UNSUPPORTED:
        value = getattr(args, arg, None)
        if value and not (pattern and arg in _HYBRID_ARGS):
            raise CheckpointError(f"{name}: saved with --{arg.replace('_', '-')} {value!r} ({what}): measure builds "
                                  "dense GPT models and attention / MLP hybrid models from Megatron-LM checkpoints; "
                                  "convert it to HuggingFace (Megatron-Bridge) and measure that")
    impl = getattr(args, "transformer_impl", "local")
    if impl not in ("local", "transformer_engine"):
        raise CheckpointError(f"{name}: saved with --transformer-impl {impl}; measure loads local and "
                              "transformer_engine checkpoints")
    pos = getattr(args, "position_embedding_type", "learned_absolute")
    if pos not in ("learned_absolute", "rope", "none"):
        raise CheckpointError(f"{name}: saved with --position-embedding-type {pos}; measure builds "
                              "learned_absolute, rope and none")
    if getattr(args, "squared_relu", False) and getattr(args, "swiglu", False):
        raise CheckpointError(f"{name}: saved with both --swiglu and --squared-relu")


def check_megatron_lm_checkpoint(path: str):
    """``(iter_dir, args)`` of the checkpoint at ``path``, checked (one line for what measure cannot build);
    cheap: the weights are not read."""
    iter_dir = resolve_megatron_lm_checkpoint(path)
    args = read_megatron_lm_args(iter_dir)
    check_supported(args, path)
    return iter_dir, args


# Megatron-LM's uneven pipeline split, copied when the model is built at the saved PP size
_PIPELINE_SPLIT = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                   "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


def _transformer_config(args, dtype: torch.dtype, tp: int = 1, pp: int = 1):
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kw = {k: getattr(args, k) for k in _ARCH if k in fields and getattr(args, k, None) is not None}
    kw["num_query_groups"] = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    if getattr(args, "apply_layernorm_1p", False):
        kw["layernorm_zero_centered_gamma"] = True
    if getattr(args, "swiglu", False):
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    elif getattr(args, "squared_relu", False):
        kw["activation_func"] = squared_relu
    # this job's layout (TP x PP; measure: one rank) and kernels: no fusions, no dropout (eval), weights built on
    # the CPU
    if hybrid_pattern(args):
        kw["is_hybrid_model"] = True
    if pp > 1:
        kw.update({k: getattr(args, k) for k in _PIPELINE_SPLIT if getattr(args, k, None) is not None})
    kw.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
              hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
              bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
              persist_layer_norm=False, use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
              bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
    return TransformerConfig(**{k: v for k, v in kw.items() if k in fields})


def _head(args):
    """Our head from the saved ``--lm-head-type`` / ``--lm-head-rank`` (None: Megatron's dense output layer); its
    initialisation is balanced (the weights are loaded afterwards: the saved ``--lm-head-init`` does not matter)."""
    if getattr(args, "lm_head_type", None) is not None:
        head = head_config_from_args(args)
        if head.kind == "low_rank":
            head = dataclasses.replace(head, options={**head.options, "init": "balanced"})
        return head
    rank = getattr(args, "lm_head_rank", None)
    if rank:
        return LowRankHeadConfig(rank=int(rank))
    return None


def build_megatron_lm_model(args, real_vocab_size: int, dtype: torch.dtype, tp: int = 1, pp: int = 1):
    """The GPTModel (HybridModel when the args have a layer pattern) ``args`` describe at TP = ``tp``, PP = ``pp``
    (measure: 1 x 1; Megatron-Core's parallel state initialised at those sizes): this rank's part, its vocabulary
    and projections sharded over TP and its pipeline stage's layers (the saved uneven split, if any; the embedding
    on the first stage, the head on the last), its weights not loaded yet; params in ``dtype``. What Megatron-Core
    itself refuses to build is one line."""
    try:
        return _build(args, real_vocab_size, dtype, tp, pp)
    except (AssertionError, ValueError, NotImplementedError, TypeError) as exc:  # megatron-core's own checks
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        kind = "a HybridModel" if hybrid_pattern(args) else "a GPT model"
        raise CheckpointError(f"the saved args describe {kind} Megatron-Core's local spec does not build "
                              f"here ({type(exc).__name__}: {first})") from None


def _build(args, real_vocab_size: int, dtype: torch.dtype, tp: int = 1, pp: int = 1):
    config = _transformer_config(args, dtype, tp, pp)
    if pp > 1:
        stage = dict(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    else:
        stage = dict(pre_process=True, post_process=True)
    pattern = hybrid_pattern(args)
    if pattern:
        hybrid_kw = dict(share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights",
                                                                         False),
                         rotary_percent=getattr(args, "rotary_percent", 1.0),
                         rotary_base=getattr(args, "rotary_base", 10000), parallel_output=True)
        return build_hybrid_model(config, int(args.padded_vocab_size), int(args.max_position_embeddings),
                                  hybrid_layer_pattern=pattern.replace("|", ""), head=_head(args),
                                  position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
                                  real_vocab_size=real_vocab_size, **stage, **hybrid_kw)
    spec_kw = dict(qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
                   normalization=getattr(args, "normalization", None))
    params = inspect.signature(get_gpt_layer_local_spec).parameters
    spec = get_gpt_layer_local_spec(**{k: v for k, v in spec_kw.items() if k in params})
    gpt_kw = dict(share_embeddings_and_output_weights=not getattr(args, "untie_embeddings_and_output_weights", False),
                  rotary_percent=getattr(args, "rotary_percent", 1.0), rotary_base=getattr(args, "rotary_base", 10000),
                  rope_scaling=getattr(args, "use_rope_scaling", False),
                  rope_scaling_factor=getattr(args, "rope_scaling_factor", None), parallel_output=True)
    allowed = inspect.signature(GPTModel.__init__).parameters
    gpt_kw = {k: v for k, v in gpt_kw.items() if k in allowed and v is not None}
    return build_gpt_model(config, int(args.padded_vocab_size), int(args.max_position_embeddings),
                           head=_head(args), layer_spec=spec,
                           position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
                           real_vocab_size=real_vocab_size, **stage, **gpt_kw)


def load_megatron_lm_weights(model, iter_dir: str, name: str) -> None:
    """``model``'s weights from the torch_dist checkpoint (resharded to this job's layout), strictly: every
    tensor of the model must be in the checkpoint with its global shape (checked against the checkpoint's
    metadata first, for a one-line error naming the first missing key)."""
    sharded = model.sharded_state_dict()
    saved = dcp.FileSystemReader(iter_dir).read_metadata().state_dict_metadata
    what = (f"the {'HybridModel' if hasattr(model, 'hybrid_layer_pattern') else 'GPT model'} its args describe "
            f"(local layer spec, {type(model.output_layer).__name__} head)")
    for t in nested_values(sharded):
        if not isinstance(t, ShardedTensor):
            continue
        size = getattr(saved.get(t.key), "size", None)
        if size is None:
            raise CheckpointError(f"{name}: its weights do not map onto {what}: no {t.key!r} in the checkpoint "
                                  f"(a layer spec measure does not build?)")
        if tuple(size) != tuple(t.global_shape):
            raise CheckpointError(f"{name}: {t.key!r} is {tuple(size)} in the checkpoint, {tuple(t.global_shape)} in "
                                  f"{what}")
    try:
        state = dist_checkpointing.load({"model": sharded}, iter_dir)
    except Exception as exc:  # noqa: BLE001 (megatron-core and torch DCP raise several kinds)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"{name}: its weights do not load into {what} ({type(exc).__name__}: {first})") from None
    missing, _unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{name}: the checkpoint lacks {len(missing)} weight(s) of {what}, e.g. {missing[0]}")


def _warn(msg: str) -> None:
    print(f"megatron-bottleneck: warning: {msg}", file=sys.stderr, flush=True)


def _gpt2_bpe(vocab_file: str, merge_file: str):
    """GPT-2's byte-level BPE from Megatron-LM's ``--vocab-file`` / ``--merge-file``, loaded as a tokenizer folder
    (transformers 5 ignores the file arguments of the tokenizer's constructor: an empty vocabulary)."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(vocab_file, os.path.join(d, "vocab.json"))
        shutil.copyfile(merge_file, os.path.join(d, "merges.txt"))
        return import_transformers().GPT2TokenizerFast.from_pretrained(d)


def megatron_lm_tokenizer(args, name: str) -> Tuple[Optional[Callable[[str], List[int]]], Optional[int], int]:
    """``(tokenize, eod, V)`` from the saved tokenizer arguments (see the module docstring); ``tokenize`` raises
    a one-line :class:`~megatron_bottleneck.base.errors.DataError` on text when no tokenizer loads."""
    kind = getattr(args, "tokenizer_type", None)
    padded = int(args.padded_vocab_size)
    given = getattr(args, "vocab_size", None)
    if kind == "NullTokenizer":
        return (no_tokenizer(name, ValueError("NullTokenizer has no vocabulary: its data are token ids")),
                int(given), int(given) + 1)
    try:
        if kind == "HuggingFaceTokenizer":
            tok = import_transformers().AutoTokenizer.from_pretrained(args.tokenizer_model)
            return (lambda text: list(tok(text)["input_ids"])), tok.eos_token_id, len(tok)
        if kind == "GPT2BPETokenizer":
            tok = _gpt2_bpe(args.vocab_file, args.merge_file)
            return (lambda text: list(tok(text)["input_ids"])), tok.eos_token_id, len(tok)
        if kind in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer"):
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_model)
            if kind == "SentencePieceTokenizer":  # Megatron adds its special tokens after the model's
                raise ValueError("SentencePieceTokenizer's special tokens are Megatron-LM's own")
            bos = [sp.bos_id()] if kind == "Llama2Tokenizer" else []
            return (lambda text: bos + list(sp.encode_as_ids(text))), sp.eos_id(), int(sp.vocab_size())
        raise ValueError(f"tokenizer type {kind} is not read by measure")
    except Exception as exc:  # noqa: BLE001 (files from the training machine may be absent; any tokenizer error)
        vocab = int(given) if given else padded
        _warn(f"{name}: its tokenizer ({kind}) does not load here ({type(exc).__name__}: "
              f"{(str(exc).splitlines() or [''])[0][:160]}); the figures use V = "
              + (f"{vocab} (--vocab-size of the run)" if given else
                 f"{vocab}, the padded vocabulary (Megatron's padding rows counted)"))
        return no_tokenizer(name, exc), None, vocab
