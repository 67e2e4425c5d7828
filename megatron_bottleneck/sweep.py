"""Sweeps over vocabulary size, head rank and learning rate on SpamLang; the CPU demo preset.

Layout of a sweep directory::

    data/V<v>_train.{bin,idx}, data/V<v>_valid.*, data/V<v>.json     one SpamLang dataset per vocabulary
    runs/V<v>_r<rank|dense>_lr<lr>/run.json, logs/, ckpt/, DONE     one directory per run (resumable)
    report.md, *.png                                                 written by ``report``

A run with ``DONE`` is skipped; an unfinished one resumes from its last checkpoint. Runs go to
``workers`` CPU processes (one thread each) in parallel.
"""
from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .data import SpamLangConfig, coverage, draw_symbols, generate_spamlang
from .train import TrainConfig


@dataclass
class SweepPlan:
    base: TrainConfig
    vocab_sizes: Sequence[int]
    lrs: Sequence[float]
    head_ranks: Sequence[Optional[int]] = (None,)
    rank_sweep_vocab: Optional[int] = None  # extra runs: head ranks on this vocabulary ...
    rank_sweep_ranks: Sequence[int] = ()
    rank_sweep_lr: Optional[float] = None  # ... at this learning rate
    spamlang_seed: int = 0
    distribution: str = "uniform"
    valid_sequences: int = 1024
    runs: List[Dict] = field(default_factory=list)

    def expand(self) -> List[Dict]:
        runs = []
        for v in self.vocab_sizes:
            for r in self.head_ranks:
                for lr in self.lrs:
                    runs.append({"vocab_size": v, "head_rank": r, "lr": lr, "rank_sweep": False})
        if self.rank_sweep_vocab:
            lr = self.rank_sweep_lr or self.lrs[0]
            for r in self.rank_sweep_ranks:
                runs.append({"vocab_size": self.rank_sweep_vocab, "head_rank": r, "lr": lr, "rank_sweep": True})
            dense = next((x for x in runs if x["vocab_size"] == self.rank_sweep_vocab and x["head_rank"] is None
                          and x["lr"] == lr), None)
            if dense is not None:
                dense["rank_sweep"] = True
        return runs


def run_name(run: Dict) -> str:
    r = "dense" if run["head_rank"] is None else f"r{run['head_rank']}"
    return f"V{run['vocab_size']}_{r}_lr{run['lr']:g}"


def _prepare_data(plan: SweepPlan, out: str) -> Dict[int, Dict]:
    base = plan.base
    train_seqs = base.train.train_steps * base.train.global_batch_size
    meta = {}
    for v in sorted({r["vocab_size"] for r in plan.expand()}):
        prefix = os.path.join(out, "data", f"V{v}")
        cfg = SpamLangConfig(vocab_size=v, seq_length=base.model.seq_length,
                             num_sequences=train_seqs + plan.valid_sequences, seed=plan.spamlang_seed,
                             distribution=plan.distribution,
                             valid_fraction=plan.valid_sequences / (train_seqs + plan.valid_sequences))
        if os.path.exists(prefix + ".json"):
            with open(prefix + ".json", encoding="utf-8") as f:
                meta[v] = json.load(f)
        else:
            meta[v] = generate_spamlang(cfg, prefix)
    return meta


def _run_config(plan: SweepPlan, run: Dict, data: Dict, run_dir: str) -> TrainConfig:
    cfg = copy.deepcopy(plan.base)
    cfg.model.vocab_size = run["vocab_size"]
    cfg.model.head_rank = run["head_rank"]
    cfg.optim.lr = run["lr"]
    cfg.data.train_prefix = data["train_prefix"]
    cfg.data.valid_prefix = data["valid_prefix"]
    cfg.logging.dir = os.path.join(run_dir, "logs")
    cfg.checkpoint.dir = os.path.join(run_dir, "ckpt")
    if cfg.probe:
        cfg.probe = dict(cfg.probe, log_dir=cfg.logging.dir)
    cfg.validate()
    return cfg


def _run_many(items: List[Dict]) -> List[str]:
    """One CPU process, several runs in sequence (each resumable)."""
    import torch

    from .train import Trainer

    torch.set_num_threads(1)
    done = []
    for item in items:
        cfg = TrainConfig.from_dict(item["config"])
        Trainer(cfg).train()
        with open(os.path.join(item["dir"], "DONE"), "w") as f:
            f.write("ok\n")
        done.append(item["dir"])
    return done


def run_sweep(plan: SweepPlan, out: str, workers: int = 2, log=print) -> List[str]:
    """Generate data, run every pending run, return the run directories."""
    from .cpu import launch

    meta = _prepare_data(plan, out)
    base = plan.base
    items = []
    for run in plan.expand():
        d = os.path.join(out, "runs", run_name(run))
        os.makedirs(d, exist_ok=True)
        data = meta[run["vocab_size"]]
        train_symbols = draw_symbols(SpamLangConfig(**data["config"]))[: data["train_sequences"]]
        seen = train_symbols[: base.train.train_steps * base.train.global_batch_size]
        cov = coverage(seen, SpamLangConfig(**data["config"]))  # draws (sequences) per symbol
        params = {**run, "hidden_size": base.model.hidden_size, "seq_length": base.model.seq_length,
                  "train_steps": base.train.train_steps, "coverage": cov,
                  "tokens_per_symbol_total": base.train.train_steps * base.train.global_batch_size
                  * base.model.seq_length / (run["vocab_size"] - 1)}
        with open(os.path.join(d, "run.json"), "w", encoding="utf-8") as f:
            json.dump(params, f, indent=2)
        if os.path.exists(os.path.join(d, "DONE")):
            log(f"skip (done): {run_name(run)}")
            continue
        items.append({"dir": d, "config": _run_config(plan, run, data, d).to_dict()})
    log(f"{len(items)} runs to do on {workers} worker(s)")
    groups = [items[i::workers] for i in range(max(1, workers))]
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        list(pool.map(lambda g: launch(_run_many, 1, g, timeout=24 * 3600) if g else None, groups))
    return [os.path.join(out, "runs", run_name(r)) for r in plan.expand()]


def demo_plan(quick: bool = False) -> SweepPlan:
    """The CPU demo: D = 16, V in {32, 256, 2048} (V/D = 2, 16, 128) x 3 learning rates, plus head ranks
    {8, 4, 2} on V = 256; every symbol of the largest vocabulary drawn dozens of times."""
    steps = 120 if quick else 1280
    base = TrainConfig.from_dict({
        "model": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "ffn_hidden_size": 64,
                  "seq_length": 16, "vocab_size": 32},
        "train": {"train_steps": steps, "global_batch_size": 64, "micro_batch_size": 64,
                  "eval_interval": max(steps // 16, 1), "eval_iters": 4, "log_interval": max(steps // 4, 1),
                  "seed": 1234},
        "optim": {"lr": 1e-2, "warmup_steps": max(steps // 25, 1), "weight_decay": 0.1},
        "checkpoint": {"save_interval": max(steps // 4, 1), "keep_last": 1},
        "logging": {"tensorboard": False, "console": False},
        "probe": {"interval": 10, "rank_interval": max(steps // 2, 1), "rank_token_budget": 512},
    })
    return SweepPlan(base=base, vocab_sizes=(32, 256, 2048), lrs=(3e-3, 1e-2, 3e-2),
                     rank_sweep_vocab=256, rank_sweep_ranks=(8, 4, 2), rank_sweep_lr=1e-2)
