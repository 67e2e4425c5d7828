"""Where ``megatron-bottleneck measure`` gets a model from: a HuggingFace causal LM (hub id or folder), a GGUF
file (or a folder holding one: llama.cpp's format, read by transformers' GGUF reader and dequantised), one of our
trainer's checkpoints, or a Megatron-LM ``torch_dist`` checkpoint (the model its saved args describe:
:mod:`.megatron_lm_checkpoint`).

Every loader returns a :class:`LoadedModel`: a callable that runs the backbone on a padded batch of token ids
``[B, L]`` and returns the head's input H ``[B, L, D]`` (the final hidden states, after the final norm: read
by a forward pre-hook on the head, so any architecture works), the head as the probe sees it (a
:class:`~megatron_bottleneck.base.head.HeadView`, W = F M), the head's bias (or None), and a tokenizer for
text data. The pre-hook stops the forward once H is read (:class:`_HeadReached`): the model's own
``[B, L, V]`` logits are never formed; the measurement forms them per token chunk.

A HuggingFace model's head is ``model.get_output_embeddings()``; it must be a ``torch.nn.Linear`` (tied or
untied). A scalar multiplier on the logits (``logit_scale``, Cohere; ``logits_scaling``, Granite: logits
divided by it) is folded into W, which keeps col(W); logit soft-capping (``final_logit_softcapping``, Gemma 2)
is not linear and is refused.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..base.device import auto_dtype, choose_device
from ..base.errors import CheckpointError, ConfigError
from ..base.head import HeadView, find_head, head_view
from ..integrations.parallel import initialize_parallel
from ..train.checkpoint import load_model_only
from ..train.probe_checkpoint import _config, resolve_checkpoint
from ..train.trainer import build_models
from .common import HF_INSTALL, ModelError, import_transformers, no_tokenizer  # noqa: F401 (re-exported)
from .megatron_lm_checkpoint import (build_megatron_lm_model, check_megatron_lm_checkpoint, load_megatron_lm_weights,
                                     megatron_lm_tokenizer)

class _HeadReached(Exception):
    """Raised by the head's pre-hook once its input is read: the rest of the forward is not needed."""


@dataclass
class LoadedModel:
    """A model ready for measurement.

    name: what was asked for (hub id or path). hidden: ``hidden(ids [B, L], mask [B, L]) -> H [B, L, D]``
    (no grad). view: the head, W = F M (``basis`` (V, k), ``mix`` (k, D) or None), float32 or float64, any
    logit multiplier folded in. bias: ``[V]`` or None. tokenize: ``text -> list of ids`` (None: the model has
    no tokenizer; token-id data only). max_length: the model's context (tokens per forward). device: where
    the backbone runs. kind: "hf", "gguf", "trainer" or "megatron-lm". dtype: the backbone's dtype as it runs
    (what ``--dtype auto`` resolved to).
    """

    name: str
    hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    view: HeadView
    bias: Optional[torch.Tensor]
    tokenize: Optional[Callable[[str], List[int]]]
    max_length: Optional[int]
    device: torch.device
    kind: str
    revision: Optional[str] = None
    eod: Optional[int] = None
    dtype: Optional[torch.dtype] = None

    @property
    def vocab_size(self) -> int:
        return int(self.view.vocab_size)

    @property
    def hidden_size(self) -> int:
        return int(self.view.factor.shape[1] if self.view.mix is None else self.view.mix.shape[1])


def _capture(head: torch.nn.Module, store: dict):
    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        store["hidden"] = hidden.detach()
        store["weight"] = kwargs.get("weight")
        raise _HeadReached

    return head.register_forward_pre_hook(pre_hook, with_kwargs=True)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return auto_dtype(device)
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype not in table:
        raise ConfigError(f"--dtype must be float32, bfloat16, float64 or auto, got {dtype!r}")
    return table[dtype]


def is_trainer_checkpoint(path: str) -> bool:
    """A directory of our trainer: an ``iter_*`` with ``config.yaml``, or a checkpoint dir with ``latest``."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "config.yaml"))
                                    or os.path.isfile(os.path.join(path, "latest")))


def is_megatron_lm_checkpoint(path: str) -> bool:
    """Megatron-LM's checkpoint layout: ``latest_checkpointed_iteration.txt``, or an ``iter_*`` of a torch_dist
    save (``metadata.json``; ``common.pt`` up to megatron-core 0.16), that is not one of our trainer's."""
    markers = ("latest_checkpointed_iteration.txt", "metadata.json", "common.pt")
    return (os.path.isdir(path) and not is_trainer_checkpoint(path)
            and any(os.path.isfile(os.path.join(path, n)) for n in markers))


ACCEPTED = ("a HuggingFace hub id or model folder (config.json), a .gguf file or a folder holding one, one of our "
            "trainer's checkpoint dirs, or a Megatron-LM torch_dist checkpoint dir")
"""What ``measure`` takes as MODEL (said in the one-line error for anything else)."""


def gguf_source(name: str) -> Optional[Tuple[str, str]]:
    """``(folder, file name)`` when ``name`` is a ``.gguf`` file or a folder with no ``config.json`` holding exactly
    one ``.gguf`` file; None otherwise. A folder with several is one line naming them."""
    if os.path.isfile(name) and name.lower().endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")):
        return None
    found = sorted(f for f in os.listdir(name) if f.lower().endswith(".gguf"))
    if len(found) > 1:
        raise ModelError(f"{name} holds {len(found)} GGUF files ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): give the one to measure, e.g. "
                         f"{os.path.join(name, found[0])}")
    return (os.path.abspath(name), found[0]) if found else None


def load_model(name: str, revision: Optional[str] = None, dtype: str = "auto",
               device: Optional[str] = None) -> LoadedModel:
    """The :class:`LoadedModel` for ``name`` (see the module docstring). Trainer and Megatron-LM checkpoints
    need an initialised process group (see :func:`load_trainer_checkpoint`)."""
    dev = choose_device(device).device
    if is_trainer_checkpoint(name):
        return load_trainer_checkpoint(name, dev)
    if is_megatron_lm_checkpoint(name):
        return load_megatron_lm_checkpoint(name, dev, dtype)
    if gguf_source(name) is None and (os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json"))):
        raise ModelError(f"{name} is a folder with no config.json and no .gguf file; measure accepts {ACCEPTED}")
    if name.lower().endswith(".gguf") and not os.path.isfile(name):
        raise ModelError(f"{name}: no such GGUF file")
    return load_hf_model(name, revision=revision, dtype=dtype, device=dev)


# ------------------------------------------------------------------------------------------ HuggingFace
def _from_pretrained(cls, name, revision, torch_dtype, gguf_file: Optional[str] = None):
    """transformers 5 takes ``dtype=``, 4.x ``torch_dtype=`` (5 still accepts it, with a warning)."""
    kw = {"revision": revision} if revision else {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    params = inspect.signature(cls.from_pretrained).parameters
    major = int(import_transformers().__version__.split(".")[0])
    key = "dtype" if major >= 5 or "dtype" in params else "torch_dtype"
    return cls.from_pretrained(name, **{key: torch_dtype}, **kw)


def _check_gguf_extras(name: str) -> None:
    """transformers reads GGUF through the ``gguf`` package and needs ``accelerate`` for it."""
    missing = []
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ModelError(f"{name} is a GGUF file; reading it needs {' and '.join(missing)}: {HF_INSTALL}")


def _drop_gguf_quantization(model) -> None:
    """The GGUF weights are dequantised on load; what remains of the quantiser (``hf_quantizer``,
    ``config.quantization_config``) only makes the model look quantised (``save_pretrained`` refuses it)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: derived from hf_quantizer
            pass


def _logit_multiplier(config, name: str) -> float:
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        raise ModelError(f"{name}: its logits are soft-capped (final_logit_softcapping={cap}), which is not a linear "
                         "head; measure supports linear heads (a scalar logit multiplier is fine).")
    scale = 1.0
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return scale


def load_hf_model(name: str, revision: Optional[str] = None, dtype: str = "auto",
                  device: Optional[torch.device] = None) -> LoadedModel:
    """A HuggingFace causal LM (hub id or local folder) through ``AutoModelForCausalLM``, or a GGUF file (or a folder
    holding one) through transformers' GGUF reader: dequantised to float32 on load, then cast to the measured
    dtype, the quantisation state dropped (:func:`_drop_gguf_quantization`)."""
    transformers = import_transformers()
    dev = device or choose_device(None).device
    tdtype = _resolve_dtype(dtype, dev)
    gguf = gguf_source(name)
    folder, gguf_file = gguf if gguf else (name, None)
    if gguf:
        _check_gguf_extras(name)
    try:
        model = _from_pretrained(transformers.AutoModelForCausalLM, folder, revision, tdtype, gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "a GGUF causal LM" if gguf else "a HuggingFace causal LM (hub id or local folder with config.json)"
        raise ModelError(f"cannot load {name!r} as {what}: {first}") from None
    if gguf:
        _drop_gguf_quantization(model)
    model.eval().to(dev)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(f"head of {name} is not a linear layer ({type(head).__name__}); measure needs "
                         "logits = W h (+ b) from a torch.nn.Linear output embedding.")
    scale = _logit_multiplier(model.config, name)
    work = torch.float64 if tdtype == torch.float64 else torch.float32
    basis = head.weight.detach().to(work) * scale
    bias = None if head.bias is None else head.bias.detach().to(work) * scale
    view = HeadView(factor=basis, mix=None, vocab_start=0, vocab_size=int(head.out_features))
    store: dict = {}
    _capture(head, store)

    @torch.no_grad()
    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        store.clear()
        try:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        except _HeadReached:
            pass
        if "hidden" not in store:
            raise ModelError(f"{name}: the forward never reached its output embedding; measure needs a model "
                             "whose logits come from model.get_output_embeddings().")
        return store["hidden"]

    tokenize, eod = None, None
    try:
        tok_kw = {"revision": revision} if revision else {}
        if gguf_file:
            tok_kw["gguf_file"] = gguf_file
        tok = transformers.AutoTokenizer.from_pretrained(folder, **tok_kw)
        if len(tok) < 2:  # transformers 5 builds an empty tokenizer for a folder without tokenizer files
            raise ValueError("no tokenizer files: the tokenizer it builds has no vocabulary")
        tokenize = lambda text: list(tok(text)["input_ids"])  # noqa: E731
        eod = tok.eos_token_id
    except Exception as exc:  # noqa: BLE001 (a folder without tokenizer files fails in many ways across versions)
        tokenize = no_tokenizer(name, exc)  # token-id data still works; text data gets this one line
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return LoadedModel(name=name, hidden=hidden, view=view, bias=bias, tokenize=tokenize, max_length=ctx,
                       device=dev, kind="gguf" if gguf else "hf", revision=revision, eod=eod, dtype=tdtype)


# ------------------------------------------------------------------------------------------ our trainer
def load_trainer_checkpoint(path: str, device: torch.device) -> LoadedModel:
    """One of our trainer's checkpoints (the ``probe`` command's loading: ``TrainConfig`` from the checkpoint,
    :func:`~megatron_bottleneck.train.checkpoint.load_model_only`). Needs an initialised process group whose
    world is the data-parallel measurement (TP = PP = 1 here)."""
    if not dist.is_initialized():
        raise CheckpointError("measuring a trainer checkpoint needs a process group (run it through "
                              "megatron_bottleneck.measure.measure_model, which starts one).")
    ckpt = resolve_checkpoint(path)
    cfg = _config(ckpt, "")
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.virtual_pipeline_model_parallel_size = None
    cfg.parallel.sequence_parallel = False
    initialize_parallel(1, 1, None, seed=cfg.train.seed)
    _, chunks = build_models(cfg)
    load_model_only(ckpt, chunks)
    return _megatron_core_model(chunks[0].eval(), path, device, cfg.model.vocab_size, cfg.model.seq_length,
                                kind="trainer")


def _megatron_core_model(model, name: str, device: torch.device, vocab_size: int, seq: int, *, kind: str,
                         tokenize=None, eod: Optional[int] = None) -> LoadedModel:
    """A loaded Megatron-Core GPTModel (TP = PP = 1, eval mode) as a :class:`LoadedModel`: H read by the pre-hook
    on its head (Megatron's ``[s, b, D]`` turned to ``[b, s, D]``), the head's view on the real vocabulary
    ``vocab_size`` (a tied head's weight is the one the forward passes it: read by a first forward)."""
    head = find_head(model)
    store: dict = {}
    _capture(head, store)

    @torch.no_grad()
    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        store.clear()
        b, s = ids.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        try:
            model(ids.to(device), pos.to(device), None)
        except _HeadReached:
            pass
        return store["hidden"].transpose(0, 1)  # Megatron's [s, b, D] -> [b, s, D]

    # a first forward to read the head's weight argument (tied embeddings pass it to the head)
    hidden(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    view = head_view(head, weight=store.get("weight"), vocab_size=vocab_size)
    work = torch.float64 if view.factor.dtype == torch.float64 else torch.float32
    view = HeadView(view.factor.detach().to(work), None if view.mix is None else view.mix.detach().to(work),
                    view.vocab_start, view.vocab_size)
    return LoadedModel(name=name, hidden=hidden, view=view, bias=None, tokenize=tokenize, max_length=seq,
                       device=device, kind=kind, eod=eod, dtype=next(model.parameters()).dtype)


# ------------------------------------------------------------------------------------------ Megatron-LM
def load_megatron_lm_checkpoint(path: str, device: torch.device, dtype: str = "auto") -> LoadedModel:
    """A Megatron-LM ``torch_dist`` checkpoint, the model built from its saved args (see
    :mod:`.megatron_lm_checkpoint`). Needs an initialised process group (the data-parallel measurement; the
    model is built at TP = PP = 1 and the weights resharded to it)."""
    if not dist.is_initialized():
        raise CheckpointError("measuring a Megatron-LM checkpoint needs a process group (run it through "
                              "megatron_bottleneck.measure.measure_model, which starts one).")
    iter_dir, args = check_megatron_lm_checkpoint(path)
    tokenize, eod, vocab = megatron_lm_tokenizer(args, path)
    if vocab > int(args.padded_vocab_size):
        raise CheckpointError(f"{path}: its tokenizer has {vocab} tokens but the model's vocabulary is "
                              f"{args.padded_vocab_size} (padded_vocab_size): not the tokenizer it was trained with")
    initialize_parallel(1, 1, None, seed=int(getattr(args, "seed", 1234)))
    saved = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) \
        else torch.float32
    model = build_megatron_lm_model(args, vocab, saved).to(device)
    load_megatron_lm_weights(model, iter_dir, path)
    want = _resolve_dtype(dtype, device)
    model = model.to(want).eval()
    seq = int(getattr(args, "seq_length", None) or args.max_position_embeddings)
    if getattr(args, "position_embedding_type", "learned_absolute") == "learned_absolute":
        seq = min(seq, int(args.max_position_embeddings))
    return _megatron_core_model(model, path, device, vocab, seq, kind="megatron-lm", tokenize=tokenize, eod=eod)
