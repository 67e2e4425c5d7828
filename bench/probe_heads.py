"""Probe cost per head: step time with the gradient probe off and on, and the probe's own time, for every
built-in head on one CPU (or GPU) GPTModel step.

    python bench/probe_heads.py [--heads dense,low_rank:r=32,mos:k=4,...] [--hidden 64] [--vocab 2048]
                                [--general-tokens 128] [--general-iterations 32] [--reps 3] [--threads N]

One process, Megatron's schedule, DDP, each head's own loss path (fused where the head has one). Linear heads
(dense, low_rank) get the probe's closed form; the others the general path (conjugate gradients with a JVP and a
VJP through the head per iteration, on ``general_tokens`` tokens per step, ``general_iterations`` iterations).
Modes ("off", "cheap": interval=1, "cheap + update": interval=1, update_interval=1) are interleaved rep by rep;
the table reports medians: the step time, the probe's time inside the step (``GradientProbe.time_hooks``: its
hooks and end_step), and the ratio to "off". Writes bench/results/probe_heads.json.
"""
import argparse
import os
import statistics
import sys

import torch

import megatron_bottleneck as mb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_overhead import interleaved_step_times, run_on_one_device, write_json  # noqa: E402

MODES = {"off": None, "cheap": dict(interval=1), "cheap + update": dict(interval=1, update_interval=1)}
HEADS = "dense,low_rank:r=32,mos:k=4,sigsoftmax,softcap,monotone,stacked"


def bench_head(args, kind: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cuda = torch.cuda.is_available()
    cfg = mb.llama_config(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=max(4, args.hidden // 128),
                          ffn_hidden_size=4 * args.hidden, use_cpu_initialization=True)
    module = mb.build_gpt_model(cfg, args.vocab, args.seq, head=mb.HeadConfig.parse(kind, seed=0),
                                real_vocab_size=args.vocab, fused_loss=True)
    model = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(),
                                    module=module.cuda() if cuda else module)
    probes = {}
    for name, kw in MODES.items():
        if kw is None:
            continue
        p = mb.GradientProbe(mb.ProbeConfig(vocab_size=args.vocab, general_tokens=args.general_tokens,
                                            general_iterations=args.general_iterations, **kw))
        p.watch(model, num_microbatches=args.num_micro)
        p.enabled, p.time_hooks = False, True
        probes[name] = p
    probe_s = {}
    times = interleaved_step_times(model, probes, list(MODES), args, probe_s)
    head = mb.find_head(model)
    errors = {n: p.last_error for n, p in probes.items() if p.last_error}
    last = {n: (p.history[-1] if p.history else {}) for n, p in probes.items()}
    base = statistics.median(times["off"])
    rows = []
    for name in MODES:
        med = statistics.median(times[name])
        pr = statistics.median(probe_s[name]) if name in probe_s else 0.0
        rows.append({"head": kind, "mode": name, "step_s": med, "probe_s": pr, "ratio_vs_off": med / base,
                     "linear": mb.base.is_linear_head(head),
                     "destroyed_ratio": last.get(name, {}).get("destroyed_ratio"),
                     "cg_residual": last.get(name, {}).get("cg_residual")})
    for p in probes.values():
        p.remove()
    return rows, errors


def run(args):
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    mb.initialize_parallel(1, 1, seed=0)
    rows, errors = [], {}
    for kind in args.heads.split(","):
        r, e = bench_head(args, kind.strip())
        print(f"{kind}: " + ", ".join(f"{x['mode']} {x['step_s']:.3f} s (probe {x['probe_s']:.3f} s)" for x in r),
              flush=True)
        rows += r
        errors.update({f"{kind} {k}": v for k, v in e.items()})
    tokens = args.seq * args.micro * args.num_micro
    return {"config": vars(args), "tokens_per_step": tokens, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": rows,
            "errors": errors}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default=HEADS)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--num-micro", type=int, default=2)
    ap.add_argument("--general-tokens", type=int, default=128)
    ap.add_argument("--general-iterations", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "probe_heads.json"))
    args = ap.parse_args()
    result = run_on_one_device(run, args)
    print(f"{result['device']} GPT step: D={args.hidden}, V={args.vocab}, {args.layers} layer(s), "
          f"{result['tokens_per_step']} tokens/step; general path: {args.general_tokens} tokens, "
          f"{args.general_iterations} CG iterations; torch {result['torch']}")
    print(f"{'head':22s} {'mode':15s} {'step (s)':>9s} {'probe (s)':>10s} {'x off':>7s} {'destroyed':>10s} {'cg resid':>9s}")
    for r in result["rows"]:
        d = "" if r["destroyed_ratio"] is None else f"{r['destroyed_ratio']:.4f}"
        c = "" if r["cg_residual"] is None else f"{r['cg_residual']:.1e}"
        print(f"{r['head']:22s} {r['mode']:15s} {r['step_s']:9.4f} {r['probe_s']:10.4f} {r['ratio_vs_off']:7.3f} "
              f"{d:>10s} {c:>9s}")
    for k, v in result["errors"].items():
        print("probe error:", k, v)
    write_json(result, args.out)


if __name__ == "__main__":
    main()
