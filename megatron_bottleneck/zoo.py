"""The head zoo benchmark: every head on the same token budget, on SpamLang at several V/D and on real text.

``megatron-bottleneck zoo CONFIG --heads dense,low_rank:r=8,mos:k=4,sigsoftmax,stacked:width=32 --out DIR``

CONFIG is a trainer config (``examples/zoo.yaml``) with an extra ``zoo:`` section (:class:`ZooSection`): the
V/D ratios of the SpamLang settings (V = ratio x D) and a text corpus (files tokenised with a SentencePiece
model of ``zoo.text_vocab_size`` tokens). Each head trains once per setting with the base config's optimiser,
steps and batch (the same tokens for every head). Heads are taken as given (no automatic budget matching):
the report states each head's parameters and forward FLOPs per token beside its figures
(:func:`megatron_bottleneck.heads.cost.head_cost`, analytic, checked against the built head's parameter
count), so a comparison at matched budgets is made by choosing the options (e.g. ``low_rank:r`` and
``stacked:width``) and read off the table.

Layout of DIR (on the sweep's machinery, :mod:`megatron_bottleneck.sweep`)::

    data/V<v>*            SpamLang datasets;  data/text_V<v>*  the tokenised corpus and its tokenizer
    heads/<setting>__<head>.json    per head and setting: parameters counted on the built head, whether the
                                    probe measures it, head + loss time and memory (:func:`inspect_heads`)
    runs/<setting>/<head>/          run.json, logs/, ckpt/, DONE: one resumable run each
    zoo.log, zoo_report.md, zoo.json, *.png

A run with ``DONE`` (or whose metrics reached the last step: a run trained by ``launch/zoo.sbatch``) is
skipped; an unfinished one resumes from its checkpoint. The probe runs on the heads it accepts (every built-in
head: the closed form for linear heads, the general path for non-linear ones); a head it refuses (no
``probe_view`` and no ``log_prob_fn``) trains without it and the report says "n/a" with the probe's reason.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .base.errors import ConfigError, HeadConfigError
from .base.head import HeadBuildContext, check_head
from .base.sinks import read_jsonl
from .data.text import tokenize_to_indexed, train_tokenizer
from .heads import HeadConfig
from .heads.cost import head_cost
from .integrations.launch import launch
from .integrations.parallel import initialize_parallel
from .models import llama_config
from .probe import GradientProbe, ProbeConfig
from .sweep import run_many, execute, pending_item, prepare_spamlang, run_paths, spamlang_run_params
from .train import TrainConfig
from .zoo_report import write_zoo_report

__all__ = ["ZooSection", "ZooPlan", "load_zoo", "run_zoo", "inspect_heads", "zoo_runs"]

HEADS_DIR = "heads"
RUNS_LIST = "runs.txt"
AUTO = "auto"
"""An option value the zoo matches to the dense head's parameter budget, per setting (``stacked:width=auto``)."""
MAX_AUTO = 64
"""``auto`` searches the integers 1 .. MAX_AUTO x D."""


@dataclass
class ZooSection:
    """The ``zoo:`` section of a zoo config."""

    heads: List[str] = field(default_factory=lambda: ["dense"])
    """Head specs ``kind[:name=value,...]`` (``--heads`` replaces them)."""
    vd_ratios: List[int] = field(default_factory=lambda: [16, 128, 512])
    """SpamLang settings: V = ratio x model.hidden_size for each ratio."""
    text_files: List[str] = field(default_factory=list)
    """The real-text corpus (.txt: paragraphs separated by blank lines; .jsonl: a "text" field); [] : none."""
    text_vocab_size: Optional[int] = None
    """Tokens of the corpus's SentencePiece model (= the text setting's V); None: 128 x hidden_size."""
    text_split: str = "95,5,0"
    """train,valid,test shares of the corpus's documents."""
    spamlang_seed: int = 0
    """Seed of the SpamLang generator."""
    valid_sequences: int = 1024
    """SpamLang validation sequences."""
    timing_tokens: Optional[int] = None
    """Tokens of the head + loss timing; None: one micro-batch (train.micro_batch_size x model.seq_length)."""
    timing_reps: int = 3
    """Timed forward + backward passes (after one warm-up)."""
    lrs: List[float] = field(default_factory=list)
    """Learning rates tried for every head (a grid; the report takes each head at its best one); [] : optim.lr."""
    seeds: List[int] = field(default_factory=list)
    """train.seed of each repeat of every (head, learning rate) run (the report gives the spread across them and
    a Welch t-test against dense); [] : train.seed once."""


@dataclass
class ZooPlan:
    base: TrainConfig
    zoo: ZooSection

    def heads(self) -> List[HeadConfig]:
        """The head specs parsed and checked (unknown kind or option, or a bad value: one line); an option
        ``auto`` stays unresolved here (:meth:`matched`)."""
        out = []
        for text in self.zoo.heads:
            head = HeadConfig.parse(text)
            auto = [k for k, v in head.options.items() if str(v).strip().lower() == AUTO]
            if len(auto) > 1:
                raise ConfigError(f"head {text!r}: one option can be {AUTO} (matched to the dense head's "
                                  f"parameters), not {', '.join(auto)}")
            if not auto:
                head.resolved_options()
            out.append(head)
        if not out:
            raise ConfigError("zoo: no heads given (--heads dense,mos:k=4,...)")
        names = [head_slug(h) for h in out]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ConfigError(f"zoo: head {dup!r} is given twice")
        return out

    def settings(self) -> List[Dict]:
        """``{"setting", "data": "spamlang" | "text", "vocab_size"}`` per setting."""
        d = self.base.model.hidden_size
        out = [{"setting": f"spamlang_V{r * d}", "data": "spamlang", "vocab_size": int(r * d)}
               for r in self.zoo.vd_ratios]
        if self.zoo.text_files:
            v = self.zoo.text_vocab_size or 128 * d
            out.append({"setting": f"text_V{v}", "data": "text", "vocab_size": int(v)})
        return out

    def matched(self, head: HeadConfig, vocab_size: int) -> HeadConfig:
        """``head`` with its ``auto`` option (if any) set to the integer whose head has the parameter count
        closest to the dense head's, V D, at this vocabulary (:func:`~megatron_bottleneck.heads.cost.head_cost`;
        ties: the smaller value; only values the trainer accepts at this D, e.g. stacked width >= D). The
        parameters grow with the option (r, width, k, partitions), so the scan stops past the budget."""
        auto = [k for k, v in head.options.items() if str(v).strip().lower() == AUTO]
        if not auto:
            return head
        d, name = self.base.model.hidden_size, auto[0]
        budget = vocab_size * d
        best = None
        for n in range(1, MAX_AUTO * d + 1):
            cand = HeadConfig(head.kind, {**head.options, name: str(n)}, seed=head.seed)
            try:
                cost = head_cost(cand, d, vocab_size)
            except HeadConfigError:
                continue
            if cost is None:
                raise ConfigError(f"head {str(head)!r}: {name}={AUTO} needs a cost function for head kind "
                                  f"{head.kind!r} (megatron_bottleneck.heads.cost.register_head_cost)")
            gap = abs(cost.params - budget)
            if best is not None and gap >= best[0]:
                if cost.params > budget:
                    break  # every larger value is further from the budget
                continue
            try:  # the trainer's own checks at this D and V
                self.run_config({"head": str(cand), "vocab_size": vocab_size, "data": "spamlang"}, None,
                                "/nonexistent", probe=False)
            except (HeadConfigError, ConfigError):
                continue
            best = (gap, cand)
        if best is None:
            raise ConfigError(f"head {str(head)!r}: no value of {name} in 1..{MAX_AUTO * d} is accepted at "
                              f"D={d}, V={vocab_size}")
        return best[1]

    def lrs(self) -> List[float]:
        return [float(x) for x in self.zoo.lrs] or [float(self.base.optim.lr)]

    def seeds(self) -> List[int]:
        return [int(x) for x in self.zoo.seeds] or [int(self.base.train.seed)]

    def expand(self) -> List[Dict]:
        """Every (setting, head, learning rate, seed) run: the setting's fields plus ``head`` (its spec, ``auto``
        resolved for the setting's vocabulary by :meth:`matched`), ``head_spec`` (as given), ``lr``, ``seed``,
        ``head_name`` (``setting/head``: where the head's inspection goes) and ``name`` (``setting/head``, with
        ``__lr<lr>_seed<seed>`` appended when the zoo has a learning-rate grid or several seeds)."""
        out = []
        lrs, seeds = self.lrs(), self.seeds()
        grid = len(lrs) > 1 or len(seeds) > 1
        for s in self.settings():
            for i, h in enumerate(self.heads()):
                m = self.matched(h, s["vocab_size"])
                head_name = f"{s['setting']}/{head_slug(m)}"
                for lr in lrs:
                    for seed in seeds:
                        name = head_name + (f"__lr{lr:g}_seed{seed}" if grid else "")
                        out.append({**s, "head": str(m), "head_spec": str(h), "head_index": i, "lr": lr,
                                    "seed": seed, "head_name": head_name, "name": name})
        return out

    def run_config(self, run: Dict, data_prefix: Optional[Dict], run_dir: str, probe: bool) -> TrainConfig:
        """The run's trainer config: the base with this head, vocabulary, data and paths (probe off unless
        ``probe``)."""
        cfg = copy.deepcopy(self.base)
        head = HeadConfig.parse(run["head"])
        opts = head.resolved_options()
        cfg.model.vocab_size = run["vocab_size"]
        cfg.model.head_type, cfg.model.head_rank = head.kind, None
        cfg.model.head_options = {k: getattr(opts, k) for k in head.options} if dataclasses.is_dataclass(opts) \
            else dict(head.options)
        if "lr" in run:
            cfg.optim.lr = float(run["lr"])
        if "seed" in run:
            cfg.train.seed = int(run["seed"])
        if data_prefix is not None:
            cfg.data.train_prefix = data_prefix["train_prefix"]
            cfg.data.valid_prefix = data_prefix.get("valid_prefix")
            if run["data"] == "text":
                cfg.data.split = self.zoo.text_split
        if not probe:
            cfg.probe = {}
        return run_paths(cfg, run_dir)

    def check(self) -> None:
        """Every head against every setting's config (r <= D, width >= D, ...), before any work."""
        for run in self.expand():
            try:
                self.run_config(run, None, "/nonexistent", probe=False)
            except HeadConfigError as exc:
                raise ConfigError(f"head {run['head']!r}: {exc}") from None


def head_slug(head: HeadConfig) -> str:
    """A file name for a head spec: ``low_rank:r=8`` -> ``low_rank_r8``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(head).replace("=", "").replace(":", "_").replace(",", "_"))


def load_zoo(path: Optional[str], overrides: Sequence[str] = (), heads: Optional[str] = None) -> ZooPlan:
    """A zoo config file (trainer sections + ``zoo:``), ``section.key=value`` overrides (``zoo.key=`` too), and
    ``heads`` (a comma-separated list of specs; a spec's own options are separated by commas as well, so each
    new spec starts with a registered kind: ``low_rank:r=8,init=orthogonal,mos:k=4``)."""
    data = TrainConfig.apply_overrides(TrainConfig.read_yaml(path), overrides)
    section = data.pop("zoo", None) or {}
    if not isinstance(section, dict):
        raise ConfigError("'zoo' must be a mapping (heads, vd_ratios, text_files, ...)")
    known = {f.name for f in dataclasses.fields(ZooSection)}
    bad = sorted(set(section) - known)
    if bad:
        raise ConfigError(f"unknown key 'zoo.{bad[0]}'; valid keys: {', '.join(sorted(known))}")
    zoo = ZooSection(**section)
    if heads:
        zoo.heads = split_heads(heads)
    if isinstance(zoo.heads, str):
        zoo.heads = split_heads(zoo.heads)
    base = TrainConfig.from_dict(data)
    for r in zoo.vd_ratios:
        if not isinstance(r, int) or r < 1:
            raise ConfigError(f"zoo.vd_ratios must be positive integers (V = ratio x D), got {r!r}")
    for lr in zoo.lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"zoo.lrs must be positive numbers (learning rates), got {lr!r}")
    for seed in zoo.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"zoo.seeds must be integers (train.seed of each repeat), got {seed!r}")
    for key in ("lrs", "seeds"):
        vals = getattr(zoo, key)
        if len(set(vals)) != len(vals):
            raise ConfigError(f"zoo.{key} lists a value twice: {vals}")
    plan = ZooPlan(base, zoo)
    plan.check()
    return plan


def split_heads(text: str) -> List[str]:
    """``"dense,low_rank:r=8,init=orthogonal,mos:k=4"`` -> ``["dense", "low_rank:r=8,init=orthogonal",
    "mos:k=4"]``: an item with ``=`` continues the previous spec's options, any other starts a new spec."""
    out: List[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ data
def prepare_data(plan: ZooPlan, out: str, log=print) -> Dict[str, Dict]:
    """setting -> ``{"train_prefix", "valid_prefix"}`` (data written once under ``out/data``)."""
    settings = plan.settings()
    spam = [s["vocab_size"] for s in settings if s["data"] == "spamlang"]
    meta = prepare_spamlang(plan.base, spam, out, plan.zoo.spamlang_seed, valid_sequences=plan.zoo.valid_sequences)
    prefixes = {s["setting"]: meta[s["vocab_size"]] for s in settings if s["data"] == "spamlang"}
    for s in settings:
        if s["data"] != "text":
            continue
        prefix = os.path.join(out, "data", f"text_V{s['vocab_size']}")
        if not os.path.exists(prefix + ".idx"):
            model = train_tokenizer(plan.zoo.text_files, s["vocab_size"], prefix + "_sp")
            counts = tokenize_to_indexed(plan.zoo.text_files, model, prefix)
            log(f"text corpus: {counts['documents']} documents, {counts['tokens']} tokens, V={s['vocab_size']}")
        prefixes[s["setting"]] = {"train_prefix": prefix, "valid_prefix": None}
    return prefixes


# ----------------------------------------------------------------------------------- head inspection
def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs (the head + loss's
    activation memory between forward and backward)."""
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _inspect_entry(jobs: List[Dict]) -> List[Dict]:
    """A process of its own (a 1-rank group) for :func:`_inspect`."""
    torch.set_num_threads(1)
    return _inspect(jobs)


def _inspect(jobs: List[Dict]) -> List[Dict]:
    """For each job, on Megatron's parallel state at TP=1: build the head at the run's sizes, count its
    parameters, ask the probe whether it measures it, time forward + backward of ``head.loss`` and record
    what autograd saves; writes each job's JSON (``job["path"]``)."""
    initialize_parallel(1, 1, None, seed=0)
    out = []
    for job in jobs:
        head = HeadConfig.parse(job["head"], seed=job["seed"])
        d, v, t = job["hidden_size"], job["vocab_size"], job["tokens"]
        cuda = torch.cuda.is_available()
        tcfg = llama_config(num_layers=1, hidden_size=d, num_attention_heads=1, ffn_hidden_size=4 * d,
                            use_cpu_initialization=True, pipeline_dtype=torch.float32,
                            init_method_std=job["init_method_std"])
        ctx = HeadBuildContext(hidden_size=d, vocab_size=v, real_vocab_size=v, config=tcfg, seed=job["seed"])
        module = check_head(head.spec().builder(ctx, head.resolved_options()), head.kind)
        device = torch.device("cuda" if cuda else "cpu")
        module = module.to(device)
        record = {"head": job["head"], "vocab_size": v, "hidden_size": d, "tokens": t, "device": device.type,
                  "params_counted": sum(p.numel() for p in module.parameters())}
        try:
            GradientProbe(ProbeConfig(interval=1, update_interval=1, log_dir=None)).watch_head(module).remove()
            record["probe"] = "on"
        except HeadConfigError as exc:
            record["probe"], record["probe_reason"] = "off", str(exc)
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(t, 1, d, generator=gen).to(device).requires_grad_(True)
        labels = torch.randint(0, v, (t, 1), generator=gen).to(device)

        def step():
            loss = module.loss(hidden, labels).float().mean()
            return loss

        walls, cpus, saved = [], [], 0
        for rep in range(job["reps"] + 1):
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
            w0, c0 = time.perf_counter(), time.process_time()
            loss, saved = _saved_bytes(step)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
                record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base_mem
            if rep:  # the first pass is a warm-up
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
        record.update(time_ms_min=1e3 * min(walls), time_ms_median=1e3 * statistics.median(walls),
                      cpu_ms_min=1e3 * min(cpus), saved_bytes=saved)
        os.makedirs(os.path.dirname(job["path"]), exist_ok=True)
        tmp = f"{job['path']}.{os.getpid()}.tmp"  # workers sharing a head's inspection may both write it
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, job["path"])
        out.append(record)
    return out


def head_stats_path(out: str, run_name: str) -> str:
    """Where a run's head inspection goes: ``<out>/heads/<setting>__<head>.json``."""
    return os.path.join(out, HEADS_DIR, run_name.replace("/", "__") + ".json")


def _inspect_jobs(plan: ZooPlan, out: str) -> Dict[str, Dict]:
    """run name -> its inspection job (:func:`_inspect`; one per setting and head, shared by the head's
    learning rates and seeds)."""
    base = plan.base
    tokens = plan.zoo.timing_tokens or base.train.micro_batch_size * base.model.seq_length
    return {run["name"]: {"head": run["head"], "vocab_size": run["vocab_size"],
                          "hidden_size": base.model.hidden_size, "tokens": tokens, "reps": plan.zoo.timing_reps,
                          "seed": base.train.seed, "init_method_std": base.model.init_method_std,
                          "path": head_stats_path(out, run["head_name"])}
            for run in plan.expand()}


def inspect_heads(plan: ZooPlan, out: str, log=print) -> Dict[str, Dict]:
    """run name -> its head's inspection (``heads/<setting>__<head>.json``); the missing ones are measured in
    one fresh CPU process (one thread) and kept across reruns."""
    jobs = _inspect_jobs(plan, out)
    todo = list({j["path"]: j for j in jobs.values() if not os.path.exists(j["path"])}.values())
    if todo:
        log(f"measuring {len(todo)} head(s): parameters, probe support, head + loss time and memory "
            f"({todo[0]['tokens']} tokens)")
        launch(_inspect_entry, 1, todo, timeout=3600)
    found = {}
    for name, job in jobs.items():
        with open(job["path"], encoding="utf-8") as f:
            found[name] = json.load(f)
    return found


def _train_runs(items: List[Dict]) -> List[str]:
    """The zoo's runner in its training process: first the head inspections not done yet (no extra process
    start), then each run with the probe on only where the inspection says the probe measures the head."""
    torch.set_num_threads(1)
    todo = list({i["inspect"]["path"]: i["inspect"] for i in items if not os.path.exists(i["inspect"]["path"])}.values())
    if todo:
        _inspect(todo)
    for item in items:
        with open(item["inspect"]["path"], encoding="utf-8") as f:
            if json.load(f)["probe"] != "on":
                item["config"]["probe"] = {}
    return run_many(items)


# --------------------------------------------------------------------------------------------- runs
def finished(run_dir: str, train_steps: int) -> bool:
    """``DONE``, or metrics logged up to the last step (a run trained outside the zoo command, e.g. by
    ``launch/zoo.sbatch``: marked ``DONE`` here)."""
    if os.path.exists(os.path.join(run_dir, "DONE")):
        return True
    path = os.path.join(run_dir, "logs", "metrics.jsonl")
    rows = read_jsonl(path) if os.path.exists(path) else []
    if rows and rows[-1].get("step", 0) >= train_steps:
        with open(os.path.join(run_dir, "DONE"), "w") as f:
            f.write("ok (metrics at the last step)\n")
        return True
    return False


def zoo_runs(plan: ZooPlan, out: str, log=print, inspect: bool = False) -> List[Dict]:
    """Data and every run's directory (run.json; ``runs.txt`` lists them in order); returns the work items of
    the runs not finished. ``inspect``: measure the heads first (:func:`inspect_heads`) and write each run's
    final ``config.yaml`` (probe off where it does not measure the head), as ``launch/zoo.sbatch`` needs."""
    data = prepare_data(plan, out, log)
    heads = inspect_heads(plan, out, log) if inspect else {}
    jobs = _inspect_jobs(plan, out)
    base = plan.base
    items, names = [], []
    for run in plan.expand():
        d = os.path.join(out, "runs", run["name"])
        head = HeadConfig.parse(run["head"])
        cost = head_cost(head, base.model.hidden_size, run["vocab_size"])
        probe = heads[run["name"]]["probe"] == "on" if inspect else True
        cfg = plan.run_config(run, data[run["setting"]], d, probe=probe)
        params = {"kind": "zoo", **run, "head_kind": head.kind, "head_options": cfg.model.head_options,
                  "head_rank": cfg.model.head_options.get("r") if head.kind == "low_rank" else None,
                  "hidden_size": base.model.hidden_size, "vd": run["vocab_size"] / base.model.hidden_size,
                  "lr": run["lr"], "seed": run["seed"], "train_steps": base.train.train_steps,
                  "tokens_per_step": base.train.global_batch_size * base.model.seq_length,
                  "params": cost.params if cost else None, "flops_per_token": cost.flops_per_token if cost else None,
                  "head_stats": os.path.relpath(jobs[run["name"]]["path"], d)}
        if run["data"] == "spamlang":
            params.update(spamlang_run_params(base, run["vocab_size"], data[run["setting"]]))
        os.makedirs(d, exist_ok=True)
        if inspect:
            cfg.save(os.path.join(d, "config.yaml"))
        names.append(d)
        finished(d, base.train.train_steps)  # marks a run trained elsewhere (all steps logged) DONE
        item = pending_item(d, params, cfg, log, name=run["name"], inspect=jobs[run["name"]])
        if item is not None:  # None: DONE (skip logged)
            items.append(item)
    with open(os.path.join(out, RUNS_LIST), "w", encoding="utf-8") as f:
        f.write("".join(os.path.relpath(n, out) + "\n" for n in names))
    return items


def run_zoo(plan: ZooPlan, out: str, workers: int = 1, log=print, prepare_only: bool = False) -> Optional[str]:
    """Everything: data, the pending runs (``workers`` CPU processes; each measures its runs' heads first),
    the head measurements still missing, the report (returns its path). ``prepare_only``: data, head
    measurements and run directories only (for ``launch/zoo.sbatch``); returns None."""
    items = zoo_runs(plan, out, log, inspect=prepare_only)
    if prepare_only:
        log(f"prepared {len(plan.expand())} runs ({len(items)} to do), listed in {os.path.join(out, RUNS_LIST)}")
        return None
    if items:
        execute(items, out, workers, log, logname="zoo.log", runner=_train_runs)
    inspect_heads(plan, out, log)  # heads of runs trained elsewhere (launch/zoo.sbatch)
    return write_zoo_report(out)
