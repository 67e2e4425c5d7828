"""Sweeps over vocabulary size, head rank and learning rate on SpamLang; the CPU demo preset.

Layout of a sweep directory::

    data/V<v>_train.{bin,idx}, data/V<v>_valid.*, data/V<v>.json     one SpamLang dataset per vocabulary
    runs/V<v>_r<rank|dense>_lr<lr>/run.json, logs/, ckpt/, DONE     one directory per run (resumable)
    report.md, *.png                                                 written by ``report``

A run with ``DONE`` is skipped; an unfinished one resumes from its last checkpoint. Runs go to
``workers`` CPU processes (one thread each) in parallel. While they run, :class:`Progress` reports runs
finished / total, each worker's current run and step, and an ETA (one refreshed line on a terminal), and
one line per finished run (also appended to ``<out>/sweep.log``).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .base.sinks import read_jsonl
from .data import SpamLangConfig, coverage, draw_symbols, generate_spamlang
from .integrations.launch import launch
from .integrations.parallel import destroy_parallel
from .train import TrainConfig, Trainer


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


def prepare_spamlang(base: TrainConfig, vocab_sizes: Sequence[int], out: str, seed: int = 0,
                     distribution: str = "uniform", valid_sequences: int = 1024) -> Dict[int, Dict]:
    """One SpamLang dataset per vocabulary size under ``<out>/data/V<v>`` (kept when already there), as many
    training sequences as ``base`` reads; returns V -> the generator's metadata."""
    train_seqs = base.train.train_steps * base.train.global_batch_size
    meta = {}
    for v in sorted(set(vocab_sizes)):
        prefix = os.path.join(out, "data", f"V{v}")
        cfg = SpamLangConfig(vocab_size=v, seq_length=base.model.seq_length,
                             num_sequences=train_seqs + valid_sequences, seed=seed, distribution=distribution,
                             valid_fraction=valid_sequences / (train_seqs + valid_sequences))
        if os.path.exists(prefix + ".json"):
            with open(prefix + ".json", encoding="utf-8") as f:
                meta[v] = json.load(f)
        else:
            meta[v] = generate_spamlang(cfg, prefix)
    return meta


def _prepare_data(plan: SweepPlan, out: str) -> Dict[int, Dict]:
    return prepare_spamlang(plan.base, [r["vocab_size"] for r in plan.expand()], out, plan.spamlang_seed,
                            plan.distribution, plan.valid_sequences)


def spamlang_run_params(base: TrainConfig, vocab_size: int, data: Dict) -> Dict:
    """What run.json records about a SpamLang run's data: D, sequence length, steps, and how often each symbol
    is drawn in the sequences the run reads (``coverage``, ``tokens_per_symbol_total``)."""
    train_symbols = draw_symbols(SpamLangConfig(**data["config"]))[: data["train_sequences"]]
    seen = train_symbols[: base.train.train_steps * base.train.global_batch_size]
    cov = coverage(seen, SpamLangConfig(**data["config"]))  # draws (sequences) per symbol
    return {"hidden_size": base.model.hidden_size, "seq_length": base.model.seq_length,
            "train_steps": base.train.train_steps, "coverage": cov,
            "tokens_per_symbol_total": base.train.train_steps * base.train.global_batch_size
            * base.model.seq_length / (vocab_size - 1)}


def run_paths(cfg: TrainConfig, run_dir: str) -> TrainConfig:
    """Point a run's logs, checkpoints and probe log into ``run_dir`` (logs/, ckpt/); validates."""
    cfg.logging.dir = os.path.join(run_dir, "logs")
    cfg.checkpoint.dir = os.path.join(run_dir, "ckpt")
    if cfg.probe:
        cfg.probe = dict(cfg.probe, log_dir=cfg.logging.dir)
    cfg.validate()
    return cfg


def _run_config(plan: SweepPlan, run: Dict, data: Dict, run_dir: str) -> TrainConfig:
    cfg = copy.deepcopy(plan.base)
    cfg.model.vocab_size = run["vocab_size"]
    cfg.model.head_rank = run["head_rank"]
    cfg.optim.lr = run["lr"]
    cfg.data.train_prefix = data["train_prefix"]
    cfg.data.valid_prefix = data["valid_prefix"]
    return run_paths(cfg, run_dir)


def run_many(items: List[Dict]) -> List[str]:
    """One CPU process, several runs in sequence (each resumable). A run stopped by SIGTERM / SIGUSR1 (the
    trainer saves and returns) is not marked ``DONE`` and the process stops there: a rerun resumes it."""
    torch.set_num_threads(1)
    done = []
    for item in items:
        cfg = TrainConfig.from_dict(item["config"])
        stopped = Trainer(cfg).train().get("stopped_by_signal")
        destroy_parallel()  # the run's process groups (and their threads) go with it
        if stopped:
            break
        with open(os.path.join(item["dir"], "DONE"), "w") as f:
            f.write("ok\n")
        done.append(item["dir"])
    return done


def _display_name(item: Dict) -> str:
    """A work item's name in progress lines: its ``name`` (the zoo's setting/head), else its directory's."""
    return item.get("name") or os.path.basename(item["dir"])


class Progress:
    """Watches the run directories of a sweep (their ``logs/metrics.jsonl`` and ``DONE``) from the parent
    process and reports progress; see the module docstring."""

    def __init__(self, items: List[Dict], groups: List[List[Dict]], out: str, log: Callable[[str], None],
                 interval: float = 2.0, stream=None, logname: str = "sweep.log"):
        self.items, self.groups, self.log, self.interval = items, groups, log, interval
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.logfile = os.path.join(out, logname)
        self.total_steps = sum(i["config"]["train"]["train_steps"] for i in items) or 1
        self.done: set = set()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll(final=True)
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.poll()

    @staticmethod
    def _step(item: Dict) -> int:
        path = os.path.join(item["config"]["logging"]["dir"], "metrics.jsonl")
        try:
            with open(path, "rb") as f:
                last = f.read().splitlines()[-1:]
            return json.loads(last[0])["step"] if last else 0
        except (OSError, ValueError, KeyError):
            return 0

    def poll(self, final: bool = False) -> None:
        steps = 0
        for item in self.items:
            name = _display_name(item)
            finished = os.path.exists(os.path.join(item["dir"], "DONE"))
            steps += item["config"]["train"]["train_steps"] if finished else self._step(item)
            if finished and item["dir"] not in self.done:
                self.done.add(item["dir"])
                self._finished(item, name)
        if self.tty and not final:
            elapsed = time.monotonic() - self.t0
            eta = elapsed * (self.total_steps - steps) / steps if steps else float("nan")
            current = []
            for w, group in enumerate(self.groups):
                item = next((i for i in group if i["dir"] not in self.done), None)
                if item is not None:
                    total = item["config"]["train"]["train_steps"]
                    current.append(f"w{w}: {_display_name(item)} {self._step(item)}/{total}")
            eta_s = f"{eta:.0f} s" if eta == eta else "?"
            self.stream.write(f"\r[{len(self.done)}/{len(self.items)} runs] {' | '.join(current)} | ETA {eta_s}\033[K")
            self.stream.flush()

    def _finished(self, item: Dict, name: str) -> None:
        rows = read_jsonl(os.path.join(item["config"]["logging"]["dir"], "metrics.jsonl"))
        valid = [r["valid_loss"] for r in rows if r.get("valid_loss") is not None]
        line = (f"[{len(self.done)}/{len(self.items)}] {name} finished at {time.monotonic() - self.t0:.0f} s: "
                f"final loss {rows[-1]['loss']:.4g}" + (f", valid loss {valid[-1]:.4g}" if valid else ""))
        if self.tty:
            self.stream.write("\r\033[K")
        self.log(line)
        with open(self.logfile, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def pending_item(run_dir: str, params: Dict, config: TrainConfig, log=print, **extra) -> Optional[Dict]:
    """Write ``run_dir/run.json`` (``params``); None when the run is finished (``DONE``: logged as skipped),
    else the work item ``{"dir", "config", **extra}`` (an unfinished run resumes from its checkpoint; an
    ``extra`` ``name`` is its name in progress lines)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    if os.path.exists(os.path.join(run_dir, "DONE")):
        log(f"skip (done): {extra.get('name') or os.path.basename(run_dir)}")
        return None
    return {"dir": run_dir, "config": config.to_dict(), **extra}


def execute(items: List[Dict], out: str, workers: int = 2, log=print, logname: str = "sweep.log",
            runner: Optional[Callable[[List[Dict]], List[str]]] = None) -> None:
    """Run the work items on ``workers`` CPU processes (one thread each, runs in sequence in each) with
    :class:`Progress`. ``runner(items)``: what each process runs (a module-level function; default
    :func:`run_many`)."""
    log(f"{len(items)} runs to do on {workers} worker(s)")
    groups = [g for g in (items[i::workers] for i in range(max(1, workers))) if g]
    with Progress(items, groups, out, log, logname=logname), \
            ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        list(pool.map(lambda g: launch(runner or run_many, 1, g, timeout=24 * 3600), groups))


def run_sweep(plan: SweepPlan, out: str, workers: int = 2, log=print) -> List[str]:
    """Generate data, run every pending run, return the run directories."""
    meta = _prepare_data(plan, out)
    items = []
    for run in plan.expand():
        d = os.path.join(out, "runs", run_name(run))
        data = meta[run["vocab_size"]]
        params = {**run, **spamlang_run_params(plan.base, run["vocab_size"], data)}
        item = pending_item(d, params, _run_config(plan, run, data, d), log)
        if item is not None:
            items.append(item)
    execute(items, out, workers, log)
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
