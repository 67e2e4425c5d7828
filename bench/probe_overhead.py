"""Step time with the gradient probe on vs off, on a CPU GPTModel step of realistic proportions.

    python bench/probe_overhead.py [--hidden 256] [--vocab 16384] [--seq 256] [--micro 4] [--reps 12]

One process (CPU mode, Megatron's schedule, DDP). The configurations are interleaved rep by rep so
that machine noise hits them alike; the table reports medians and the ratio to "off" measured in the
same run. Writes bench/results/probe_overhead.json.
"""
import argparse
import json
import os
import statistics
import time

import torch

import megatron_bottleneck as mb

MODES = {
    "off": None,
    "cheap every step": dict(interval=1),
    "cheap + update every step": dict(interval=1, update_interval=1),
    "rank every step": dict(interval=0, rank_interval=1),
}


def interleaved_step_times(model, probes, modes, args, probe_seconds=None):
    """Median-ready step times per mode: ``{mode: [seconds per rep]}``, the modes interleaved rep by rep after one
    warm-up step; ``probes`` maps a mode to its (watching) probe, enabled only in its mode; a mode without one
    runs with every probe off. With ``probe_seconds`` (a dict), also each mode's probe time per rep
    (``GradientProbe.seconds`` differences: set ``time_hooks`` on the probes)."""
    cuda = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)

    def step():
        batches = []
        for _ in range(args.num_micro):
            t = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=gen)
            batches.append({"tokens": t[:, :-1], "labels": t[:, 1:]})
        mb.forward_backward(model, batches)
        for p in probes.values():
            if p.enabled:
                p.end_step()
        if cuda:
            torch.cuda.synchronize()

    times = {name: [] for name in modes}
    step()  # warm-up
    for _ in range(args.reps):
        for name in modes:
            for p_name, p in probes.items():
                p.enabled = p_name == name
            head = mb.find_head(model)  # a disabled probe leaves the head's request as the last mode set it
            if mb.base.is_lm_head(head):
                head.loss_request.record = False
            before = probes[name].seconds if name in probes else 0.0
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            if probe_seconds is not None and name in probes:
                probe_seconds.setdefault(name, []).append(probes[name].seconds - before)
    return times


def run(args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    mb.initialize_parallel(1, 1, seed=0)
    cfg = mb.llama_config(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=max(4, args.hidden // 128),
                          ffn_hidden_size=4 * args.hidden, use_cpu_initialization=True)
    module = mb.build_gpt_model(cfg, args.vocab, args.seq, head_rank=args.head_rank, real_vocab_size=args.vocab,
                                fused_loss=args.fused_loss)
    model = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(),
                                    module=module.cuda() if cuda else module)
    tokens_per_step = args.seq * args.micro * args.num_micro
    probes = {}
    for name, kw in MODES.items():
        if kw is None:
            continue
        p = mb.GradientProbe(mb.ProbeConfig(rank_token_budget=tokens_per_step, vocab_size=args.vocab, **kw))
        p.watch(model, num_microbatches=args.num_micro)
        p.enabled = False
        probes[name] = p
    times = interleaved_step_times(model, probes, list(MODES), args)
    base = statistics.median(times["off"])
    rows = []
    for name in MODES:
        med = statistics.median(times[name])
        rows.append({"mode": name, "median_s": med, "ratio_vs_off": med / base,
                     "overhead_pct": 100 * (med / base - 1),
                     "overhead_ms_per_1k_tokens": 1000 * (med - base) / (tokens_per_step / 1000)})
    return {"config": vars(args), "tokens_per_step": tokens_per_step, "V_over_D": args.vocab / args.hidden,
            "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows}


def write_json(result, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", path)


def run_on_one_device(fn, args):
    """``fn(args)`` on one GPU (NCCL, this process) or, without one, in one spawned CPU rank (gloo)."""
    if torch.cuda.is_available():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(mb.integrations.free_port()))
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        return fn(args)
    return mb.launch(fn, 1, args, timeout=3600)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--num-micro", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--head-rank", type=int, default=None, help="low-rank head (default: Megatron's dense head)")
    ap.add_argument("--fused-loss", action="store_true", help="the fused head + loss (the probe reads its statistics)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "probe_overhead.json"))
    args = ap.parse_args()
    result = run_on_one_device(run, args)
    print(f"{result['device']} GPT step: D={args.hidden}, V={args.vocab} (V/D={result['V_over_D']:g}), {args.layers} layers, "
          f"{result['tokens_per_step']} tokens/step, torch {result['torch']}")
    print(f"{'mode':28s} {'median step (s)':>16s} {'x off':>7s} {'overhead %':>11s} {'ms / 1k tokens':>15s}")
    for r in result["rows"]:
        print(f"{r['mode']:28s} {r['median_s']:16.4f} {r['ratio_vs_off']:7.3f} {r['overhead_pct']:11.2f} "
              f"{r['overhead_ms_per_1k_tokens']:15.2f}")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
