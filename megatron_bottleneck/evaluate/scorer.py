"""Log-likelihoods of token sequences under one of our trainer's checkpoints, in this one process.

:func:`open_checkpoint` loads a checkpoint the way ``megatron-bottleneck probe`` does (its ``config.yaml``,
the trainer's model builder, :func:`~megatron_bottleneck.train.checkpoint.load_model_only`) at TP = PP = 1:
distributed checkpointing reshards a checkpoint saved at any TP/PP size. Any head loads (dense or low-rank
``W = A B``): the scorer only reads the model's logits.

Math. For a context ``c`` (tokens ``c_1..c_m``) and a continuation ``x`` (``x_1..x_n``),

    log p(x | c) = sum_{j=1..n} log softmax(z_{m+j-1})[x_j],

where ``z_t`` (length V, the unpadded vocabulary) is the model's logit vector after reading the first ``t``
tokens of ``c x``. A sequence longer than the model's context ``L = seq_length`` keeps its last ``L + 1``
tokens (truncation from the left; the continuation too when ``n > L``). ``is_greedy`` says whether every
``x_j`` is the argmax of its ``z``. Rolling log-likelihood of a whole text: lm-eval's disjoint rolling
windows of at most ``L`` predicted tokens, the first conditioned on the EOD token (documents follow an EOD in
our training data: there is no BOS).

Batching: requests sorted by length (longest first), right-padded, one forward per batch of ``batch_size``
sequences ``[b, s]`` -> logits ``[b, s, V]``; causal attention leaves the real tokens unchanged by the padding.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..base.device import DeviceChoice, choose_device
from ..base.errors import CheckpointError, DataError, DeviceError
from ..data.spamlang import spamlang_sequence_tokens
from ..data.text import load_tokenizer, recorded_tokenizer
from ..integrations.cpu import cpu_mode
from ..integrations.parallel import destroy_parallel, initialize_parallel
from ..train.checkpoint import load_model_only
from ..train.config import TrainConfig
from ..train.probe_checkpoint import resolve_checkpoint
from ..train.trainer import build_models

__all__ = ["CheckpointScorer", "checkpoint_config", "open_checkpoint", "resolve_checkpoint", "checkpoint_tokenizer"]


def checkpoint_config(ckpt: str) -> TrainConfig:
    """The training config saved in checkpoint ``ckpt`` (an ``iter_*`` directory)."""
    try:
        return TrainConfig.load(os.path.join(ckpt, "config.yaml"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}: its config.yaml does not load ({exc})") from None


def _prefixes(cfg: TrainConfig) -> List[str]:
    """Dataset prefixes of the data section (blends ``"0.7 a 0.3 b"`` give their paths)."""
    out = []
    for text in filter(None, (cfg.data.train_prefix, cfg.data.valid_prefix)):
        for part in text.split():
            try:
                float(part)
            except ValueError:
                out.append(part)
    return out


def checkpoint_tokenizer(cfg: TrainConfig, tokenizer: Optional[str] = None, eod_token: Optional[str] = None):
    """The text tokenizer of a checkpoint's data: ``tokenizer`` when given, else the one recorded beside the
    training data (``<prefix>.tokenizer.json``, written by ``tokenize_to_indexed``)."""
    if tokenizer:
        return load_tokenizer(tokenizer, eod_token)
    prefixes = _prefixes(cfg)
    if cfg.data.mock or (prefixes and all(spamlang_sequence_tokens(p) is not None for p in prefixes)):
        raise DataError("this checkpoint was trained on SpamLang (or mock) integer tokens: it has no text "
                        "tokenizer, so text tasks cannot be scored on it")
    for p in prefixes:
        rec = recorded_tokenizer(p)
        if rec:
            return load_tokenizer(rec["model_file"], eod_token or rec.get("eod_token"))
    raise DataError(f"no tokenizer recorded beside the checkpoint's data {prefixes} (<prefix>.tokenizer.json): "
                    "pass --tokenizer with the SentencePiece .model or tokenizer.json the data was tokenised with")


@dataclass
class CheckpointScorer:
    """Scores token sequences with a loaded model chunk (``model(tokens [b, s], positions [b, s], None)`` ->
    logits ``[b, s, V_padded]``); ``vocab_size``: the real vocabulary ``V``; ``max_length``: the context ``L``;
    ``eod``: the id documents end with (the tokenizer's), read before a text with no context."""

    model: torch.nn.Module
    vocab_size: int
    max_length: int
    eod: int
    device: torch.device
    batch_size: int = 8

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` token ids -> float32 logits ``[b, s, V]``."""
        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand(tokens.shape[0], -1)
        out = self.model(tokens, positions, None)
        return out[..., : self.vocab_size].float()

    def loglikelihood(self, requests: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(context ids, continuation ids)`` pair (see the
        module docstring); an empty context is read as the EOD token."""
        windows = []
        for ctx, cont in requests:
            if not cont:
                raise DataError("an lm-eval request has an empty continuation: nothing to score")
            full = ([self.eod] if not ctx else list(ctx)) + list(cont)
            full = full[-(self.max_length + 1):]
            windows.append((full, min(len(cont), len(full) - 1)))
        return self._score(windows)

    def loglikelihood_rolling_many(self, texts: Sequence[Sequence[int]]) -> List[float]:
        """log p(text) per token list, summed over lm-eval's disjoint rolling windows of at most ``L``
        predicted tokens (the windows of all texts batched together)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, tokens in enumerate(texts):
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=list(tokens), prefix_token=self.eod, max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx) + list(pred), len(pred)))
                owner.append(k)
        out = [0.0] * len(texts)
        for k, (lp, _greedy) in zip(owner, self._score(windows)):
            out[k] += lp
        return out

    def _score(self, windows: List[Tuple[List[int], int]]) -> List[Tuple[float, bool]]:
        """``(full sequence, n)`` -> log-likelihood of its last ``n`` tokens given the ones before."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out: List[Optional[Tuple[float, bool]]] = [None] * len(windows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(windows[i][0]) for i in idx) - 1
            inp = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                seq = windows[i][0][:-1]
                inp[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            logp = torch.log_softmax(self.logits(inp), dim=-1)
            for row, i in enumerate(idx):
                full, n = windows[i]
                pos = torch.arange(len(full) - 1 - n, len(full) - 1, device=logp.device)
                target = torch.tensor(full[-n:], dtype=torch.long, device=logp.device)
                rows = logp[row, pos]
                out[i] = (float(rows.gather(1, target[:, None]).double().sum()),
                          bool((rows.argmax(dim=-1) == target).all()))
        return out  # type: ignore[return-value]


@contextlib.contextmanager
def _one_rank(choice: DeviceChoice) -> Iterator[None]:
    """A one-rank process group on ``choice`` (unless one exists: its world must be 1), CPU mode for a CPU
    choice only, Megatron's parallel state at TP = PP = 1; all undone afterwards."""
    own = not dist.is_initialized()
    if own:
        store = dist.HashStore()  # one rank, one process: no TCP port
        if not choice.cpu_mode:
            torch.cuda.set_device(choice.device)
        dist.init_process_group(choice.backend, store=store, rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise DeviceError("eval runs in one process: start it without torchrun")
    try:
        with (cpu_mode() if choice.cpu_mode else contextlib.nullcontext()):
            initialize_parallel(1, 1, seed=0)
            try:
                yield
            finally:
                destroy_parallel()
    finally:
        if own:
            dist.destroy_process_group()


@contextlib.contextmanager
def open_checkpoint(path: str, device: str = "auto", batch_size: int = 8, eod: int = 0) -> Iterator[Tuple[CheckpointScorer,
                                                                                          TrainConfig]]:
    """``with open_checkpoint(path) as (scorer, config):`` the checkpoint's model at TP = PP = 1 on ``device``
    (auto | cpu | cuda | cuda:N, by :func:`~megatron_bottleneck.base.device.resolve_device`: auto is the GPU
    ``cuda:LOCAL_RANK`` when one is visible, else the CPU; a GPU asked for and absent is one
    :class:`DeviceError` line) in eval mode; bf16 on a GPU when the run trained in bf16 (or auto), fp32 on CPU."""
    choice = choose_device(device)  # before anything loads
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    p = cfg.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.virtual_pipeline_model_parallel_size, p.sequence_parallel = None, False
    if choice.cpu_mode:
        cfg.train.precision, cfg.train.cpu_initialization = "fp32", True
    with _one_rank(choice):
        _tcfg, chunks = build_models(cfg)
        try:
            load_model_only(ckpt, chunks)
        except BaseException as exc:  # torch's CheckpointException is a BaseException, its text many lines
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            lines = [x.strip() for x in str(exc).splitlines() if x.strip() and not set(x.strip()) <= set("^~")]
            raise CheckpointError(f"{ckpt}: the model does not load from it ({lines[-1] if lines else type(exc).__name__}"
                                  "): its config.yaml must be the one saved with these weights") from None
        model = chunks[0].to(choice.device).eval()
        yield CheckpointScorer(model, cfg.model.vocab_size, cfg.model.seq_length, eod=eod, device=choice.device,
                               batch_size=batch_size), cfg
