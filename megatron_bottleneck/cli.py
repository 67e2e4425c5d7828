"""``megatron-bottleneck``: spamlang | train | sweep | zoo | probe | measure | eval | report | demo | bench-train |
convert-head.

Devices (``--device`` / ``train.device``: auto | cpu | cuda | cuda:N): auto runs on the GPUs when visible (one per
rank, NCCL, bf16), else on CPU ranks (gloo, CPU mode, fp32); cpu runs on CPU ranks; cuda / cuda:N run on that GPU
or stop with one error line, never silently on the CPU (sweep, zoo and demo run CPU processes). Without ``torchrun`` the ranks are started on this machine
(``--nproc``); under ``torchrun`` they are its ranks (no GPU there: an error unless ``MB_CPU=1``). Options and
``section.key=value`` overrides may come in any order. Errors print one line per distinct message
(``error: ...``), whichever rank raised them, and exit with status 2 for bad input (1 for anything else);
``--debug`` adds the tracebacks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
import traceback

from .base.errors import BottleneckError, ConfigError, RankFailure, error_messages
from .base.quiet import quiet_megatron_warnings


def _floats(text):
    return [float(x) for x in text.split(",") if x]


def _overlaps(text):
    values = {"off": False, "false": False, "on": True, "true": True}
    bad = [x for x in text.split(",") if x and x not in values]
    if bad:
        raise ConfigError(f"--overlap takes off and/or on (e.g. off,on), got {bad[0]!r}")
    return [values[x] for x in text.split(",") if x]


def _ranks(text):
    return [None if x in ("dense", "none") else int(x) for x in text.split(",") if x]


def cmd_spamlang(a):
    from .data import SpamLangConfig, generate_spamlang  # function-level: keeps `--help` free of megatron-core

    meta = generate_spamlang(SpamLangConfig(a.vocab_size, a.seq_length, a.num_sequences, a.distribution,
                                            a.zipf_exponent, a.seed, a.valid_fraction), a.output)
    print(json.dumps({k: meta[k] for k in ("train_prefix", "valid_prefix", "train_sequences",
                                           "coverage_sequences")}, indent=2))


def cmd_train(a):
    from .train import TrainConfig, run

    cfg = TrainConfig.load(a.config, a.overrides)
    out = run(cfg, nproc=a.nproc)
    print(f"finished at step {out['iteration']}" + (" (stopped by signal)" if out.get("stopped_by_signal") else ""))


def cmd_sweep(a):
    from .sweep import SweepPlan, run_sweep
    from .train import TrainConfig

    base = TrainConfig.load(a.config, a.overrides)
    plan = SweepPlan(base=base, vocab_sizes=[int(v) for v in a.vocab_sizes.split(",")], lrs=_floats(a.lrs),
                     head_ranks=_ranks(a.head_ranks), spamlang_seed=a.seed)
    run_sweep(plan, a.out, workers=a.workers)
    from .report import write_report

    print("report:", write_report(a.out, a.out, title="Sweep report"))


def cmd_zoo(a):
    from .zoo import load_zoo, run_zoo

    plan = load_zoo(a.config, a.overrides, heads=a.heads)
    path = run_zoo(plan, a.out, workers=a.workers, prepare_only=a.prepare_only)
    if path:
        print("report:", path)


def cmd_probe(a):
    _check_device(a.device)
    from .train import probe_checkpoint

    figures = probe_checkpoint(a.checkpoint, a.data, batches=a.batches, nproc=a.nproc, device=a.device)
    text = json.dumps(figures, indent=2)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


def _check_device(device):
    """A GPU asked for and absent: one error line before the heavy imports (the APIs check again, the same way)."""
    from .base.device import choose_device

    choose_device(device)


def cmd_measure(a):
    _check_device(a.device)
    from .measure import MeasureConfig, load_model_list, measure_model

    try:  # transformers' loading bars and notices are not measure's output (errors still come as one line)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    entries = [{"model": m} for m in a.models]
    if a.config:
        entries += load_model_list(a.config)
    cfg = MeasureConfig(models=[e["model"] for e in entries], data=a.data, out=a.out, revision=a.revision,
                        revisions=[e.get("revision") for e in entries], labels=[e.get("label") for e in entries],
                        papers=[e.get("paper") for e in entries], documents=a.documents, seq_length=a.seq_length,
                        max_tokens=a.max_tokens, rank_budget=a.rank_budget, batch_size=a.batch_size, dtype=a.dtype,
                        device=a.device, seed=a.seed, progress=not a.no_progress)
    results = measure_model(cfg)
    if results:
        from .measure.output import markdown_table

        print(markdown_table(results), end="")
        print("wrote", os.path.join(a.out, "measure.md"))
        if importlib.util.find_spec("matplotlib") is None:
            print("no plots: matplotlib is not installed (pip install 'megatron-bottleneck[plot]')")


def cmd_eval(a):
    _check_device(a.device)
    from .evaluate import evaluate_checkpoint

    limit = None if a.limit is None else (int(a.limit) if a.limit >= 1 else a.limit)
    results = evaluate_checkpoint(a.checkpoint, tasks=[t.strip() for t in a.tasks.split(",")], out_dir=a.out,
                                  batch_size=a.batch_size, device=a.device, limit=limit,
                                  include_path=a.include_path, tokenizer=a.tokenizer, num_fewshot=a.num_fewshot)
    for task, metrics in sorted(results.get("results", {}).items()):
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "_stderr" not in k)
        print(f"{task}: {shown}")
    print("results:", results["path"])


def cmd_convert_head(a):
    _check_device(a.device)
    from .convert import convert_head

    res = convert_head(a.checkpoint, a.head, a.out, device=a.device)
    print(f"wrote {res['path']}: low_rank r={res['rank']} head from the SVD of the trained dense head (D="
          f"{res['hidden_size']}; keeps {100 * res['kept']:.2f}% of its squared Frobenius norm), "
          f"step {res['iteration']}")
    if res["kind"] == "megatron-lm":
        print(f"resume: python -m megatron_bottleneck.megatron_lm pretrain_gpt.py <the run's arguments> {res['resume']}"
              f" (saved at TP = {res['tensor_model_parallel_size']}, PP = {res['pipeline_model_parallel_size']}, "
              "resharded to the run's TP / PP on load; no optimizer state: Adam and the "
              "learning-rate schedule start afresh)")
        return
    print(f"resume: megatron-bottleneck train {os.path.join(res['path'], 'config.yaml')} (or your config with "
          f"model.head_rank={res['rank']} checkpoint.dir={a.out}); "
          + ("the optimizer state is the checkpoint's but for the head's factors (Adam moments zero)"
             if res["optimizer_kept"] else "the optimizer state starts afresh (the checkpoint held none)"))


def cmd_report(a):
    from .report import write_report

    print("report:", write_report(a.runs, a.out or a.runs))


def cmd_demo(a):
    from .report import write_report
    from .sweep import demo_plan, run_sweep

    t0 = time.time()
    plan = demo_plan(quick=a.quick)
    print(f"SpamLang demo: D={plan.base.model.hidden_size}, V in {list(plan.vocab_sizes)}, lr in {list(plan.lrs)}, "
          f"head ranks {list(plan.rank_sweep_ranks)} on V={plan.rank_sweep_vocab}; "
          f"{plan.base.train.train_steps} steps x {plan.base.train.global_batch_size} sequences per run -> {a.out}")
    run_sweep(plan, a.out, workers=a.workers)
    path = write_report(a.out, a.out, title="SpamLang demo: the LM-head gradient bottleneck on a CPU")
    print(open(path, encoding="utf-8").read())
    print(f"report: {path} ({time.time() - t0:.0f} s)")


def cmd_bench_train(a):
    from .bench_train import bench_train, format_table, write_json
    from .train import TrainConfig

    cfg = TrainConfig.load(a.config, a.overrides)
    rows = bench_train(cfg, steps=a.steps, warmup=a.warmup, nproc=a.nproc,
                       head_ranks=_ranks(a.head_ranks) if a.head_ranks else (),
                       fp8_recipes=[None if x == "none" else x for x in a.fp8.split(",")] if a.fp8 else (),
                       overlaps=_overlaps(a.overlap) if a.overlap else ())
    if os.environ.get("RANK", "0") != "0":  # under torchrun every rank holds the rows: rank 0 reports
        return
    print(format_table(rows))
    if a.out:
        write_json(rows, a.out)
        print("wrote", a.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-bottleneck", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("spamlang", help="generate a SpamLang dataset (Megatron indexed format)")
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--seq-length", type=int, default=64)
    s.add_argument("--num-sequences", type=int, default=100_000)
    s.add_argument("--distribution", choices=("uniform", "zipf"), default="uniform")
    s.add_argument("--zipf-exponent", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--valid-fraction", type=float, default=0.02)
    s.add_argument("--output", required=True, help="output prefix (writes <prefix>_train/_valid/.json)")
    s.set_defaults(fn=cmd_spamlang)

    s = sub.add_parser("train", help="train from a YAML config (section.key=value overrides)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.add_argument("--nproc", type=int, default=None, help="local ranks (default: TP x PP), on train.device: one GPU "
                   "each when visible (auto, cuda), else CPU ranks; ignored under torchrun")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("sweep", help="grid over vocabulary size, head rank and learning rate on SpamLang")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.add_argument("--vocab-sizes", required=True, help="e.g. 256,4096")
    s.add_argument("--head-ranks", default="dense", help="e.g. dense,64,16")
    s.add_argument("--lrs", default="1e-3", help="e.g. 3e-4,1e-3")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("zoo", help="the head zoo benchmark: every head on SpamLang at several V/D and on text, "
                                   "one report")
    s.add_argument("config", help="a trainer config with a zoo: section (examples/zoo.yaml)")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.add_argument("--heads", default=None, help="head specs, e.g. dense,low_rank:r=8,mos:k=4,sigsoftmax,"
                   "stacked:width=32 (default: zoo.heads of the config)")
    s.add_argument("--workers", type=int, default=1, help="CPU processes training runs in parallel")
    s.add_argument("--prepare-only", action="store_true", help="data, head measurements and run directories "
                   "(runs.txt) only, for launch/zoo.sbatch; rerun without it for the report")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_zoo)

    s = sub.add_parser("probe", help="bottleneck figures of a saved checkpoint on a dataset")
    s.add_argument("checkpoint", help="checkpoint directory (the one holding 'latest', or an iter_* dir)")
    s.add_argument("--data", required=True, help="indexed dataset prefix")
    s.add_argument("--batches", type=int, default=4)
    s.add_argument("--nproc", type=int, default=None, help="local ranks (default: the checkpoint's TP x PP)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda: auto is one GPU per rank when visible, "
                   "else CPU ranks; cuda without enough GPUs is an error (default: auto)")
    s.add_argument("--out", default=None, help="write the figures as JSON here")
    s.set_defaults(fn=cmd_probe)

    s = sub.add_parser("measure", help="bottleneck figures of trained models (HuggingFace, ours or Megatron-LM's) "
                                       "on real text")
    s.add_argument("models", nargs="*", metavar="MODEL", help="hub id, local HuggingFace folder, .gguf file (or a "
                   "folder holding one), trainer checkpoint or Megatron-LM torch_dist checkpoint")
    s.add_argument("--data", nargs="+", required=True, help=".txt / .jsonl files or indexed dataset prefixes")
    s.add_argument("--out", required=True, help="output directory (measure.json, measure.md, PNGs)")
    s.add_argument("--config", default=None, help="a YAML list of models (model, revision, label, paper)")
    s.add_argument("--revision", default=None, help="HuggingFace revision (a training checkpoint's branch)")
    s.add_argument("--documents", type=int, default=None, help="shuffled documents to measure (0: all; default: "
                   "10,000 on a GPU, 200 on a CPU)")
    s.add_argument("--seq-length", type=int, default=None, help="tokens per document (default: the model's context; "
                   "at most 1024 on a CPU)")
    s.add_argument("--max-tokens", type=int, default=None, help="stop after this many predicted tokens")
    s.add_argument("--rank-budget", type=int, default=4096, help="tokens of the rank-vs-tokens curve (0: none)")
    s.add_argument("--batch-size", type=int, default=8, help="documents per forward")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float64"))
    s.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto: the local GPU when one "
                   "is visible, else the CPU); a GPU that is not there is an error")
    s.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_measure)

    from .evaluate.tasks import DEFAULT_TASKS  # light: no megatron-core, no lm-eval

    s = sub.add_parser("eval", help="zero-shot scores of a checkpoint through lm-evaluation-harness (the [eval] "
                                    "extra)")
    s.add_argument("checkpoint", help="checkpoint directory (the one holding 'latest', or an iter_* dir)")
    s.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval tasks (default: "
                   "%(default)s)")
    s.add_argument("--out", default=None, help="write results.json here (default: <run_dir>/eval when the "
                   "checkpoint lies in a run directory, else <checkpoint dir>/eval)")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: the local GPU when "
                   "one is visible, else the CPU); a GPU that is not there is an error")
    s.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    s.add_argument("--num-fewshot", type=int, default=0)
    s.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    s.add_argument("--tokenizer", default=None, help="SentencePiece .model or tokenizer.json (default: the one "
                   "recorded beside the checkpoint's training data)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("convert-head", help="factorise the dense LM head of a trainer or Megatron-LM torch_dist "
                                            "checkpoint into a rank-r head (best rank-r approximation), as a "
                                            "checkpoint that resumes with it")
    s.add_argument("checkpoint", help="trainer checkpoint directory (the one holding 'latest', or an iter_* dir), or a "
                   "Megatron-LM torch_dist checkpoint (--save directory or one of its iter_* dirs)")
    s.add_argument("--head", required=True, help="the new head, low_rank:r=R (1 <= R <= hidden size)")
    s.add_argument("--out", required=True, help="directory for the converted checkpoint (a new checkpoint.dir)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda: auto is one GPU per rank when visible, "
                   "else CPU ranks (default: auto); one rank per TP x PP rank of the checkpoint")
    s.set_defaults(fn=cmd_convert_head)

    s = sub.add_parser("report", help="markdown + PNG report from run logs")
    s.add_argument("runs", help="directory holding run directories (run.json, logs/config.yaml, or Megatron-LM's "
                                "logs/megatron_lm*.log from launch/megatron_lm*.sbatch)")
    s.add_argument("--out", default=None)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("demo", help="the CPU demo: SpamLang vocabulary, learning-rate and head-rank sweep + report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--quick", action="store_true", help="a 1-minute smoke version (too short to learn)")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("bench-train", help="tokens/s, step-time shares, MFU and peak memory of N training steps")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--nproc", type=int, default=None, help="local ranks (default: TP x PP), on train.device: one GPU "
                   "each when visible (auto, cuda), else CPU ranks; ignored under torchrun")
    s.add_argument("--head-ranks", default=None, help="one row per head rank, e.g. dense,256,32")
    s.add_argument("--fp8", default=None, help="one row per backbone FP8 recipe (x head rank), e.g. "
                   "none,delayed,tensorwise (Transformer Engine and a GPU)")
    s.add_argument("--overlap", default=None, help="one row per data-parallel overlap setting (x head rank), side "
                   "by side with tokens/s ratios: off,on")
    s.add_argument("--out", default=None, help="write the rows (per rank and aggregated) as JSON here")
    s.set_defaults(fn=cmd_bench_train)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Options, positionals and ``key=value`` overrides in any order (``train CONFIG --nproc 2 a.b=1``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((i for i, a in enumerate(argv) if a in subparsers.choices), None)
    if command is None:
        return parser.parse_args(argv)  # prints usage / help and exits
    args = subparsers.choices[argv[command]].parse_intermixed_args(argv[:command] + argv[command + 1:])
    args.command, args.debug = argv[command], debug
    return args


def main(argv=None) -> int:
    from .integrations.bridge import mark_old_nvrx_absent  # megatron-core free

    mark_old_nvrx_absent()  # before megatron-core's first import (nvidia-resiliency-ext 0.4.1 breaks it)
    args = parse_args(argv)
    quiet_megatron_warnings("ignore")  # they concern the ranks, which show each once
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except (BottleneckError, RankFailure, FileNotFoundError) as exc:
        code = 2 if isinstance(exc, (BottleneckError, FileNotFoundError)) else 1
        if isinstance(exc, BottleneckError) and os.environ.get("LOCAL_RANK", "0") != "0" and not args.debug:
            return code  # under torchrun every rank of a node raises the same input error: its local rank 0 says it
        for message in error_messages(exc):
            print(f"error: {message}", file=sys.stderr)
        _debug_output(exc, args.debug)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _debug_output(exc: BaseException, debug: bool) -> None:
    tracebacks = getattr(exc, "tracebacks", None) or {}
    if not debug:
        if isinstance(exc, RankFailure):
            print("(run with --debug for the tracebacks)", file=sys.stderr)
        return
    for rank, text in sorted(tracebacks.items()):
        print(f"--- rank {rank} ---\n{text}", file=sys.stderr)
    if not tracebacks:
        traceback.print_exception(exc, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
