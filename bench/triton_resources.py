"""Registers, spills and shared memory of every Triton kernel of the package, compiled without a GPU.

    python bench/triton_resources.py [--json PATH] [--dtypes bf16,fp16,fp32] [--archs sm_80,sm_90a,sm_100a]

Compiles each kernel of ``megatron_bottleneck/ops/triton_linear_cross_entropy.py`` at its shipped
configuration (``CONFIGS``: per kernel, input dtype and GPU family) with Triton's own compiler for sm_80,
sm_90a and sm_100a (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``), reads
``ptxas-blackwell -v`` of the PTX (registers per thread, spill stores / loads, stack frame) and Triton's
``metadata.shared`` (bytes per block), and prints a table; ``--json PATH`` writes one row per kernel x dtype
x arch with ``kernel``, ``dtype``, ``arch``, ``registers``, ``spill_bytes``, ``shared_bytes`` (and
``spill_load_bytes``, ``stack_bytes``, ``shared_limit``, the configuration). Exit status 1 when a 16-bit
kernel spills or a kernel's shared memory exceeds its family's limit (sm80: 99 KB, as sm_86 / sm_89; sm90 /
sm100: 227 KB). The compiled kernels land in Triton's cache: a second run takes seconds.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from megatron_bottleneck.ops import triton_linear_cross_entropy as tk  # noqa: E402


def violations(rows):
    """The rows that break the targets: spills for 16-bit inputs, shared memory over the family's limit."""
    return [r for r in rows
            if (r["dtype"] != "fp32" and r["spill_bytes"] > 0) or r["shared_bytes"] > r["shared_limit"]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--archs", default=",".join(tk.ARCHS))
    args = ap.parse_args(argv)
    reason = tk.compile_unavailable()
    if reason:
        print(f"triton_resources: cannot compile here: {reason}.", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = tk.compile_resources(tuple(args.dtypes.split(",")), tuple(args.archs.split(",")))
    import triton

    print(f"Triton {triton.__version__}, {len(rows)} compiles in {time.time() - t0:.0f} s (per thread: registers, "
          f"spill stores / loads in bytes; shared per block in KiB)\n")
    print("| kernel | dtype | arch | tile (m x n x k) | warps | stages | registers | spill st/ld B | shared KiB "
          "| limit KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['block_m']}x{r['block_n']}x{r['block_k']} | "
              f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_bytes']}/{r['spill_load_bytes']} | "
              f"{r['shared_bytes'] / 1024:.1f} | {r['shared_limit'] // 1024} |")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    bad = violations(rows)
    for r in bad:
        print(f"OVER TARGET: {r['kernel']} {r['dtype']} {r['arch']}: {r['spill_bytes']} B spilled, "
              f"{r['shared_bytes']} B shared (limit {r['shared_limit']})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
