"""``megatron-bottleneck measure``: the bottleneck figures of a trained model on real text, no parameter update.

Per token t (N tokens in all, over every measured document), with H the head input, W = F M the head (V x D),
z_t = W h_t (+ b), p_t = softmax(z_t), y_t the next token:

    g_t = p_t - onehot(y_t)                           (row t of the logit gradient, V)
    dh_t = g_t W                                      (what reaches the backbone, D)
    ||P g_t||^2 = dh_t (W^T W)^+ dh_t^T               (P: the projector onto col(W))
    destroyed ratio r = sqrt(1 - sum_t ||P g_t||^2 / sum_t ||g_t||^2),  visible cosine sqrt(1 - r^2)
    grad_norm = ||G||_F with G = dL/dZ of the mean cross-entropy, rows g_t / N

exactly as the gradient probe defines them: the sums go through the probe's own
:class:`~megatron_bottleneck.probe.stats.StepAccumulator` (float64 sums; ``isotropic_baseline`` likewise),
the rank of G against tokens through its :class:`~megatron_bottleneck.probe.spectrum.GramAccumulator` (the
first ``rank_budget`` tokens, float64 Gram, numerical rank with its tolerance, effective rank, components for
70 / 90 / 99 / 99.9 % of the energy). Per document d: r_d from the same sums over its own tokens
(:func:`~megatron_bottleneck.probe.linalg.token_visible_energy`); reported as mean, std and quantiles.

Memory: the backbone runs on ``batch_size`` documents at a time; the head's logits are formed per chunk of S
tokens with S x V float32 within ``memory_budget_bytes`` (:func:`~megatron_bottleneck.ops.slice_rows`), so
nothing V-sized per token outlives a chunk, except the rank budget's rows of G (``rank_budget`` x V float64,
kept by the Gram accumulator: see README for budgets of 100k+ tokens).

Data parallel (under ``torchrun`` or :func:`megatron_bottleneck.launch`): each rank measures a shard of the
documents (the rank curve's documents on rank 0), the float64 partial sums are SUM-all-reduced in one vector
and rank 0 writes; the figures equal one process's up to the order of float64 additions.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..base.device import choose_device
from ..base.errors import ConfigError, DataError
from ..integrations.launch import launch
from ..ops import slice_rows
from ..probe.spectrum import GramAccumulator
from ..probe.linalg import isotropic_baseline, pinv_psd, row_sq_norms, token_visible_energy
from ..probe.stats import StepAccumulator
from ..train.trainer import init_distributed
from .documents import load_documents, shard
from .megatron_lm_checkpoint import check_megatron_lm_checkpoint
from .output import write_outputs
from .sources import LoadedModel, is_megatron_lm_checkpoint, is_trainer_checkpoint, load_model

__all__ = ["MeasureConfig", "measure_model", "measure_loaded", "load_model_list", "QUANTILES"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DEFAULT_SEQ_LENGTH = 2048  # when the model states no context
GPU_DOCUMENTS = 10000
"""Documents measured by default on a GPU (``documents=None``)."""
CPU_DOCUMENTS = 200
"""Documents measured by default on a CPU: the paper's 10,000 at a model's full context take hours there."""
CPU_SEQ_LENGTH = 1024
"""Tokens per document by default on a CPU (the model's context when shorter)."""
HOURS_WARNING_S = 3600.0
"""An estimated run longer than this on a CPU gets a suggestion in the plan line."""


@dataclass
class MeasureConfig:
    """What ``measure`` runs (the CLI's options).

    models: hub ids, local HuggingFace folders, trainer checkpoint dirs or Megatron-LM ``torch_dist``
    checkpoint dirs (one result each); revisions, labels, papers: per model (a YAML list's entries), the
    revision overriding ``revision``.
    data: ``.txt`` / ``.jsonl`` files or indexed dataset prefixes (see :mod:`.documents`).
    out: output directory (``measure.json``, ``rank_curve.png``, ``measure.md``; one sub-directory per model
    when several). revision: HuggingFace revision (branch, tag, commit) for every model (a training
    checkpoint); per model in a YAML list. documents: how many shuffled documents (0: all; None: 10,000 on a
    GPU, :data:`CPU_DOCUMENTS` on a CPU). seq_length: tokens per document (None: the model's context, capped at
    2048 when it states none, and at :data:`CPU_SEQ_LENGTH` on a CPU). max_tokens: stop after this many
    predicted tokens (None: no cap). rank_budget: tokens of the rank curve (0: none).
    batch_size: documents per forward. dtype: the backbone's dtype (float32 | bfloat16 | float64 | auto:
    bf16 on GPUs, fp32 on CPUs); the head's logits and softmax are float32 (float64 with float64).
    device: None/auto (the local GPU ``cuda:LOCAL_RANK`` when one is visible, else CPU), cpu, cuda or cuda:N;
    a GPU asked for and absent is an error (:func:`~megatron_bottleneck.base.device.resolve_device`). seed: the document shuffle's.
    memory_budget_bytes: the head's per-chunk working memory (S x V float32 logits and gradient).
    progress: a progress bar with tokens/s on rank 0 (tqdm when installed and stderr is a terminal, else a
    plain line every 10 s).
    """

    models: List[str] = field(default_factory=list)
    data: List[str] = field(default_factory=list)
    out: str = "measure"
    revision: Optional[str] = None
    revisions: List[Optional[str]] = field(default_factory=list)
    labels: List[Optional[str]] = field(default_factory=list)
    papers: List[Optional[str]] = field(default_factory=list)
    documents: Optional[int] = None
    seq_length: Optional[int] = None
    max_tokens: Optional[int] = None
    rank_budget: int = 4096
    batch_size: int = 8
    dtype: str = "auto"
    device: Optional[str] = None
    seed: int = 0
    memory_budget_bytes: int = 256 * 2**20
    progress: bool = True


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled, self.total, self.label, self.done, self.t0 = enabled, total, label, 0, time.perf_counter()
        self.bar, self.last = None, 0.0
        if enabled and sys.stderr.isatty():  # a log file gets a plain line every 10 s instead
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc=label, file=sys.stderr,
                                leave=False)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:  # tqdm shows its own rate: the only one on screen
            self.bar.update(n)
            return
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        if time.perf_counter() - self.last > 10 or self.done >= self.total:
            self.last = time.perf_counter()
            print(f"{self.label}: {self.done}/{self.total} tokens, {rate:,.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _seq_length(cfg: MeasureConfig, model: LoadedModel) -> int:
    if cfg.seq_length:
        if model.max_length and cfg.seq_length > model.max_length:
            raise ConfigError(f"--seq-length {cfg.seq_length} exceeds {model.name}'s context ({model.max_length})")
        return int(cfg.seq_length)
    seq = int(min(model.max_length or DEFAULT_SEQ_LENGTH, 10**6))
    return min(seq, CPU_SEQ_LENGTH) if model.device.type == "cpu" else seq


def _documents(cfg: MeasureConfig, model: LoadedModel) -> int:
    if cfg.documents is not None:
        return int(cfg.documents)
    return CPU_DOCUMENTS if model.device.type == "cpu" else GPU_DOCUMENTS


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def plan_line(model: LoadedModel, cfg: MeasureConfig, documents: int, tokens: int, seq: int, budget: int,
              rate: float) -> str:
    """The plan ``measure`` prints once a first batch has been measured (its timed warm-up): documents, tokens,
    the rank budget's memory (``budget`` rows of G in float64 plus its ``budget``^2 Gram), the rate so far and
    the estimated time; on a CPU, past :data:`HOURS_WARNING_S`, a suggestion that fits an hour."""
    v = model.vocab_size
    budget = min(budget, tokens)
    gram = budget * v * 8 + budget * budget * 8
    eta = tokens / max(rate, 1e-9)
    defaults = []
    if cfg.documents is None:
        defaults.append("documents")
    if not cfg.seq_length and model.device.type == "cpu" and seq == CPU_SEQ_LENGTH:
        defaults.append("seq-length")
    line = (f"measure {model.name}: {documents} documents, {tokens:,} tokens (<= {seq} per document), on "
            f"{model.device} in {str(model.dtype).replace('torch.', '')}; rank budget {budget} tokens "
            f"({_gib(gram)} float64); {rate:,.0f} tok/s after a first batch: about "
            f"{eta / 60:.1f} min")
    if defaults:
        line += f" (CPU defaults for {' and '.join(defaults)}: set --documents / --seq-length to change them)"
    if model.device.type == "cpu" and eta > HOURS_WARNING_S:
        fit = max(1, int(documents * HOURS_WARNING_S / eta))
        line += (f"; that is {eta / 3600:.1f} h on this CPU: --documents {fit} fits about an hour, or measure on "
                 "a GPU (--device cuda)")
    return line


def _batch(docs: List[np.ndarray]):
    """Right-padded inputs ``[B, L]``, mask ``[B, L]`` and the labels of the real positions (row-major)."""
    length = max(d.shape[0] - 1 for d in docs)
    ids = torch.zeros(len(docs), length, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    labels = []
    for i, d in enumerate(docs):
        n = d.shape[0] - 1
        ids[i, :n] = torch.from_numpy(d[:-1])
        mask[i, :n] = 1
        labels.append(torch.from_numpy(d[1:]))
    return ids, mask, torch.cat(labels)


def _distribution(ratios: np.ndarray) -> Dict[str, float]:
    if ratios.size == 0:
        return {}
    out = {"documents": int(ratios.size), "mean": float(ratios.mean()), "std": float(ratios.std()),
           "min": float(ratios.min()), "max": float(ratios.max())}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(ratios, q))
    return out


def measure_loaded(model: LoadedModel, cfg: MeasureConfig) -> Optional[Dict]:
    """Measure one loaded model on ``cfg.data`` (this process's share of it under data parallelism); the
    figures on rank 0, None on the other ranks."""
    rank, world = _world()
    seq = _seq_length(cfg, model)
    docs = load_documents(cfg.data, model.tokenize, documents=_documents(cfg, model), seq_length=seq, seed=cfg.seed,
                          max_tokens=cfg.max_tokens, vocab_size=model.vocab_size)
    if len(docs) < world:
        raise DataError(f"{len(docs)} documents for {world} data-parallel ranks: give more documents or fewer ranks")
    budget = max(0, int(cfg.rank_budget))
    mine = shard(docs, rank, world, first_tokens=budget)
    view, bias = model.view, model.bias
    n_real = view.valid_rows()
    dev = model.device
    f = view.factor[:n_real].to(dev)
    mix = None if view.mix is None else view.mix.to(dev)
    b = None if bias is None else bias[:n_real].to(dev, f.dtype)
    acc = StepAccumulator(padding=False)
    gram = GramAccumulator(budget) if (rank == 0 and budget > 0) else None
    # (W^T W)^+ for the per-document figures (float64, once)
    ff = (f.double().t() @ f.double())
    wtw_pinv, _ = pinv_psd(ff if mix is None else mix.double().t() @ ff @ mix.double())
    doc_g2 = torch.zeros(len(mine), dtype=torch.float64)
    doc_vis = torch.zeros(len(mine), dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    chunk = slice_rows(cfg.memory_budget_bytes // 2, n_real)  # logits and gradient: 2 x S x V float32
    total = sum(docs[i].shape[0] - 1 for i in mine)
    bar = _Progress(total, os.path.basename(model.name.rstrip("/")) or model.name, cfg.progress and rank == 0)
    t0 = time.perf_counter()
    planned = rank != 0
    all_tokens = sum(d.shape[0] - 1 for d in docs)
    for start in range(0, len(mine), max(1, cfg.batch_size)):
        if not planned and tokens:  # after the first batch: its rate is the plan's estimate
            planned = True
            rate = tokens * world / max(time.perf_counter() - t0, 1e-9)
            print(plan_line(model, cfg, len(docs), all_tokens, seq, budget, rate), file=sys.stderr, flush=True)
        idx = mine[start:start + max(1, cfg.batch_size)]
        ids, mask, labels = _batch([docs[i] for i in idx])
        hidden = model.hidden(ids, mask)  # [B, L, D]
        h_all = hidden[mask.to(hidden.device).bool()]  # [N_b, D], documents in order
        lens = mask.sum(1)
        owner = torch.repeat_interleave(torch.arange(start, start + len(idx)), lens)
        labels = labels.to(dev)
        for c0 in range(0, h_all.shape[0], chunk):
            h = h_all[c0:c0 + chunk].to(f.dtype)
            y = labels[c0:c0 + chunk]
            u = h if mix is None else h @ mix.t()
            z = u @ f.t()
            if b is not None:
                z = z + b
            z_y = z.gather(1, y[:, None])[:, 0]
            top = z.max(dim=1, keepdim=True).values
            g = z.sub_(top).exp_()  # in place: one exp pass for the log-sum-exp and the softmax
            total = g.sum(dim=1, keepdim=True)
            loss_sum += (top[:, 0] + total[:, 0].log() - z_y).double().sum().cpu()
            g.div_(total)
            g[torch.arange(g.shape[0], device=g.device), y] -= 1.0  # softmax - onehot
            del z
            dh = g @ f
            if mix is not None:
                dh = dh @ mix
            acc.add_logit_grad(g, view)
            acc.add_hidden_grad(dh)
            if gram is not None and not gram.full:
                gram.add(g, view)
            who = owner[c0:c0 + chunk]
            doc_g2.index_add_(0, who, row_sq_norms(g).cpu())
            doc_vis.index_add_(0, who, token_visible_energy(dh, wtw_pinv).cpu())
            tokens += g.shape[0]
            bar.update(g.shape[0])
    bar.close()
    seconds = time.perf_counter() - t0
    # one SUM all-reduce of every float64 partial sum (F^T F counted once: rank 0's)
    flat = acc.local_payload(weight_share=1.0 if rank == 0 else 0.0).double().cpu()
    extra = torch.tensor([float(tokens), float(loss_sum), seconds], dtype=torch.float64)
    flat = torch.cat([flat, extra])
    if world > 1:
        flat = flat.to(dev) if dist.get_backend() == "nccl" else flat
        dist.all_reduce(flat)
        flat = flat.cpu()
    stats, extra = flat[:-3], flat[-3:]
    per_doc = [(mine[i], float(doc_g2[i]), float(doc_vis[i])) for i in range(len(mine))]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, per_doc)
        per_doc = [x for part in gathered for x in part]
    rank_fig = gram.finalize() if gram is not None else {}
    if rank != 0:
        return None
    fig = acc.figures(stats.to(acc.k.device if acc.k is not None else "cpu"))
    names = list(fig)
    fig = acc.host_figures(dict(zip(names, torch.stack([fig[n].cpu() for n in names]).tolist())))
    n_tok = int(extra[0])
    per_doc.sort()
    ratios = np.array([math.sqrt(min(max(1.0 - v / g2, 0.0), 1.0)) for _, g2, v in per_doc if g2 > 0])
    head_rank = int(fig["head_rank"])
    out = {
        "model": model.name, "revision": model.revision, "kind": model.kind,
        "vocab_size": model.vocab_size, "hidden_size": model.hidden_size, "head_rank": head_rank,
        "tokens": n_tok, "documents": len(docs), "seq_length": seq,
        "dtype": str(model.dtype).replace("torch.", "") if model.dtype is not None else cfg.dtype,
        "dtype_requested": cfg.dtype, "device": str(model.device),
        "destroyed_ratio": fig["destroyed_ratio"], "visible_cosine": fig["visible_cosine"],
        "isotropic_baseline": isotropic_baseline(head_rank, model.vocab_size),
        "grad_norm": fig["grad_norm"] / n_tok, "hidden_grad_norm": fig["hidden_grad_norm"] / n_tok,
        "loss": float(extra[1]) / n_tok,
        "per_document": _distribution(ratios),
        "rank_budget": budget,
        "rank": {k: v for k, v in rank_fig.items() if k != "rank_curve"},
        "rank_curve": rank_fig.get("rank_curve", []),
        "data_parallel_size": world,
        "seconds": float(extra[2]) / world,
        "tokens_per_second": n_tok / max(float(extra[2]) / world, 1e-9),
    }
    return out


def load_model_list(path: str) -> List[Dict]:
    """A YAML list of models: each entry a hub id / path string, or a mapping with ``model`` and optionally
    ``revision``, ``label`` and ``paper`` (the paper's reported figure, shown beside the measurement)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    if isinstance(data, dict):
        data = data.get("models")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--config {path}: expected a YAML list of models (or a mapping with a 'models' list)")
    out = []
    for i, entry in enumerate(data):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"--config {path}: entry {i} has no 'model' (a hub id or path)")
        unknown = set(entry) - {"model", "revision", "label", "paper"}
        if unknown:
            raise ConfigError(f"--config {path}: entry {i} has unknown key(s) {sorted(unknown)} "
                              "(model, revision, label, paper)")
        out.append(entry)
    return out


def _measure_rank(cfg_dict: Dict, index: int) -> Optional[Dict]:
    """One model of ``cfg`` on this rank (the entry of launched / torchrun ranks)."""
    cfg = MeasureConfig(**cfg_dict)
    name = cfg.models[index]
    revision = cfg.revisions[index] if index < len(cfg.revisions) and cfg.revisions[index] else cfg.revision
    model = load_model(name, revision=revision, dtype=cfg.dtype, device=cfg.device)
    return measure_loaded(model, cfg)


def _torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _run_one(cfg: MeasureConfig, index: int) -> Optional[Dict]:
    if _torchrun():
        return _measure_rank(asdict(cfg), index)
    name = cfg.models[index]
    if is_megatron_lm_checkpoint(name):  # what it cannot build is one line before any rank starts
        check_megatron_lm_checkpoint(name)
    if is_trainer_checkpoint(name) or is_megatron_lm_checkpoint(name):  # Megatron-Core: one rank with a group
        return launch(_measure_rank, 1, asdict(cfg), index, timeout=24 * 3600, device=cfg.device)[0]
    return _measure_rank(asdict(cfg), index)


def measure_model(cfg: MeasureConfig) -> List[Dict]:
    """Measure every model of ``cfg`` and write the outputs under ``cfg.out`` (rank 0); returns the results
    (rank 0; an empty list on the other ranks).

    Device: ``cfg.device`` by :func:`~megatron_bottleneck.base.device.resolve_device`, decided before anything
    loads (a GPU asked for and absent is one :class:`~megatron_bottleneck.base.errors.DeviceError` line).
    Outside torchrun, a trainer or Megatron-LM checkpoint runs in one launched rank on that device (a GPU rank
    with NCCL, or a CPU rank in CPU mode); a HuggingFace model in this process. Under torchrun each rank takes
    ``cuda:LOCAL_RANK`` (or CPU ranks on purpose: ``--device cpu`` or ``MB_CPU=1``)."""
    if not cfg.models:
        raise ConfigError("measure: give at least one MODEL (or --config models.yaml)")
    if not cfg.data:
        raise ConfigError("measure: give --data PATH (a .txt / .jsonl file or an indexed dataset prefix)")
    if _torchrun():
        init_distributed(cfg.device, option="--device")
    else:
        choose_device(cfg.device)  # a GPU that is not there: one line, before any model loads
    results = []
    for i in range(len(cfg.models)):
        res = _run_one(cfg, i)
        if res is not None:
            if i < len(cfg.labels) and cfg.labels[i]:
                res["label"] = cfg.labels[i]
            if i < len(cfg.papers) and cfg.papers[i]:
                res["paper"] = cfg.papers[i]
            results.append(res)
    if results:
        write_outputs(results, cfg.out)
    return results
