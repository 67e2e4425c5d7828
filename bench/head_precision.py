"""16-bit accuracy of every built-in head against float64, as ratios to Megatron's dense path's error (issue 25's
measurement; the unit test ``tests/unit/test_head_precision.py`` runs the same code at V = 4096, T = 256).

    python bench/head_precision.py [--vocab 16384] [--tokens 512] [--hidden 64] [--heads "dense;mos:k=3,fused=false;..."]
                                   [--dtypes bfloat16,float16]
                                   [--json bench/results/head_precision.json]

For each head kind, dtype (bf16, fp16) and input (Zipfian labels with peaked or flat logits): the relative
Frobenius errors of the per-token loss, dL/dh and every parameter's gradient against float64 on the same
16-bit-rounded parameters and inputs, divided by Megatron's dense path's (16-bit logits from a 16-bit GEMM,
float32 ``vocab_parallel_cross_entropy``) error of the loss, dL/dh and dL/dW on the same inputs. Problems and
reference: ``tests/support_precision.py``. CPU, one process (Megatron's parallel state at TP = 1 on gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_bottleneck as mb  # noqa: E402
from tests import support_precision as sp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", default=";".join(sp.KINDS), help="head kinds separated by ';' (default: every one)")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="16-bit dtypes to run (comma-separated)")
    ap.add_argument("--json", default="bench/results/head_precision.json")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.heads.split(";") if k.strip()]
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rows = []
    print(f"V={args.vocab} T={args.tokens} D={args.hidden}: error / dense path's error "
          f"(params: / dense dL/dW; max over the head's parameters)")
    print(f"{'head':36s} {'dtype':9s} {'inputs':7s} {'loss':>6s} {'dL/dh':>6s} {'dL/dW':>6s} {'params':>6s}  "
          f"{'loss err':>9s} {'dense':>9s}")
    with mb.cpu_mode():
        mb.initialize_parallel(1, 1, seed=1)
        for kind in kinds:
            for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
                for peaked in (True, False):
                    t0 = time.time()
                    got, dense, _ = sp.measure(kind, dtype, peaked, d=args.hidden, v=args.vocab, tokens=args.tokens)
                    ratio = {k: got[k] / (dense[k] if k in ("loss", "dh") else dense["dw"]) for k in got}
                    others = [ratio[k] for k in ratio if k not in ("loss", "dh", "dweight")]
                    row = {"kind": kind, "dtype": str(dtype).replace("torch.", ""),
                           "inputs": "peaked" if peaked else "flat", "errors": got, "dense_errors": dense,
                           "ratios": ratio, "seconds": time.time() - t0}
                    rows.append(row)
                    print(f"{kind:36s} {row['dtype']:9s} {row['inputs']:7s} {ratio['loss']:6.2f} {ratio['dh']:6.2f} "
                          f"{ratio['dweight']:6.2f} {max(others) if others else float('nan'):6.2f}  "
                          f"{got['loss']:9.2e} {dense['loss']:9.2e}", flush=True)
        mb.destroy_parallel()
    dist.destroy_process_group()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "rows": rows}, f, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    main()
