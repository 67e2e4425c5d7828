"""Throughput (tokens/s) and peak memory of ``megatron-bottleneck measure`` on a small random HuggingFace model.

    python bench/measure.py [--hidden 256] [--layers 4] [--vocab 32768] [--docs 64] [--seq 256] \
        [--dtypes float32,bfloat16] [--rank-budget 0] [--device cpu|cuda] [--out bench/results/measure_cpu.json]

A GPT-2-style model (tied head) is built from its config and saved with ``save_pretrained``; each dtype then runs
in its own fresh process (this script with ``--child``) so memory figures do not leak between rows: the model
is loaded and measured on ``--docs`` random token documents of ``--seq`` tokens. Columns: tokens measured,
wall seconds of the measurement loop (model loading excluded), tokens/s, and peak memory: on a CPU the
process's peak RSS (``ru_maxrss``, model and Python included), on a GPU ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(args) -> None:
    import resource

    import torch

    from megatron_bottleneck.measure import MeasureConfig, load_model, measure_loaded

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = MeasureConfig(models=[args.model], data=[args.data], documents=0, seq_length=args.seq,
                        rank_budget=args.rank_budget, batch_size=args.batch_size, dtype=args.dtype,
                        device=args.device, progress=False)
    res = measure_loaded(model, cfg)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"dtype": args.dtype, "tokens": res["tokens"], "seconds": res["seconds"],
                      "tokens_per_second": res["tokens_per_second"], "peak_memory_mib": peak,
                      "destroyed_ratio": res["destroyed_ratio"], "device": args.device}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank-budget", type=int, default=0)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    if args.child:
        return _child(args)
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="bench_measure_")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers,
                                  n_head=max(1, args.hidden // 64), n_positions=max(args.seq, 64))
    transformers.GPT2LMHeadModel(cfg).save_pretrained(os.path.join(tmp, "model"))
    gen = torch.Generator().manual_seed(1)
    data = os.path.join(tmp, "docs.jsonl")
    with open(data, "w") as f:
        for _ in range(args.docs):
            f.write(json.dumps({"tokens": torch.randint(0, args.vocab, (args.seq + 1,), generator=gen).tolist()}) + "\n")
    rows = []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", os.path.join(tmp, "model"),
               "--data", data, "--dtype", dtype, "--device", device, "--seq", str(args.seq),
               "--batch-size", str(args.batch_size), "--rank-budget", str(args.rank_budget),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if out.returncode:
            raise SystemExit(f"{dtype}: {out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    meta = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "docs": args.docs, "seq": args.seq,
            "batch_size": args.batch_size, "rank_budget": args.rank_budget, "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"GPT-2-style D={args.hidden}, {args.layers} layers, V={args.vocab}, {args.docs} x {args.seq} tokens, "
          f"batch {args.batch_size}, {device}")
    print("| dtype | tokens | seconds | tokens/s | peak memory (MiB) | destroyed ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_second']:,.0f} | "
              f"{r['peak_memory_mib']:,.0f} | {r['destroyed_ratio']:.4f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
