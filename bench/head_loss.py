"""LM head + cross-entropy, fwd+bwd: Megatron's unfused path vs the fused op vs torch's chunked one.

    python bench/head_loss.py [--quick] [--reps 3] [--T 4096] [--D 1024] [--V 49152] [--ranks 32,64,128,512]
    python bench/head_loss.py --dtype bfloat16 [--accuracy] ...   # 16-bit rows, with gradient errors

Every configuration runs in its own fresh process (this script with ``--child``), so memory figures do
not leak between them. Rows:

* megatron dense: logits = H W^T, Megatron's ``vocab_parallel_cross_entropy`` (TP=1, a 1-rank gloo group)
* megatron low-rank (unfused): U = H B^T, logits = U A^T, ``vocab_parallel_cross_entropy``
* fused low-rank: U = H B^T, ``megatron_bottleneck.ops.linear_cross_entropy(U, A, y)``
* fused dense: ``linear_cross_entropy(H, W, y)`` (per-token loss, then ``.mean()``; backward recomputes
  the logits: 4 GEMMs)
* torch chunked low-rank / dense: ``torch.nn.functional.linear_cross_entropy(..., options=
  LinearCrossEntropyOptions())`` on (U, A) / (H, W), where the installed torch has it (else n/a)
* GPU only (n/a on a CPU, or when the package is missing): fused low-rank / dense (triton), the op with
  ``kernel="triton"``; liger low-rank / dense, Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
  (``pip install liger-kernel``); cce low-rank / dense, Apple's ``cut_cross_entropy.linear_cross_entropy``
  (``pip install cut-cross-entropy``)

On a GPU (``--device cuda``, the default when CUDA is there) tensors are bfloat16 unless ``--dtype``
says otherwise, working memory is ``max_memory_allocated`` during one step above the allocation before
it, times are synchronised wall times and the ratios use them; the matmul peak is an 8192^3 GEMM in the
run's dtype.

Columns: minimum and median wall time of the timed fwd+bwd steps (after one warm-up step), the
minimum process CPU time of a step (``time.process_time``; with ``--threads 1`` it is the work done and
hardly moved by other load on a shared machine, so the "x megatron" time ratio uses it), working memory = peak RSS during
one step above the RSS just before it, measured in a second fresh process (Linux: VmHWM reset through
/proc/self/clear_refs; allocations >= 128 KiB are mmapped there via MALLOC_MMAP_THRESHOLD_ and so leave
RSS when freed: RSS tracks live memory; the persistent .grad buffers exist before the step), the
achieved GFLOP/s on model FLOPs (dense 6 T V D; low-rank 6 T r (D + V); the fused op's logit
recompute is not counted) at the minimum time, and float32 matmul peaks measured in the same run: once
at the start (2048^3) and in each row's process right before its timed steps (1024^3), the latter
being the "% of peak" reference since machine load varies between rows. "x ideal" is the row's time
relative to megatron dense divided by its FLOPs relative to megatron dense (1.0: as fast per FLOP as the
dense head). Loss is the mean over tokens (grad_out = 1/T). Writes bench/results/head_loss.json
(``--out``).

Launches: each row also reports ``chunks`` (vocabulary chunks per pass of the fused torch loop: ceil(V /
C), C from the memory budget, ``ops.chunk_count``; 1 for a materialised head) and ``ops/step``: the aten
operators that launch work (views and bare allocations not counted) in one fwd+bwd step, counted with a
``TorchDispatchMode`` on the row's device; on a GPU each is about one kernel launch. A second table
projects the fused torch loop to GPU-sized shapes without a GPU: the op runs fwd+bwd on ``meta`` tensors
(shapes and dtypes, no data) along the CUDA path (float32-output 16-bit GEMMs), where the dispatch mode
counts its operators, once with the former 64 MiB GPU budget and once per free-memory figure with
``ops.memory_budget_for`` (``--gpu-shapes T,k,V_local;...``, ``--gpu-free-gib``).

``--accuracy`` (the default for a 16-bit ``--dtype``): the data is a trained-like problem instead of
random (``ops.reference.peaked_zipf_problem``: Zipfian labels, the top class ~10% of the tokens; logits
peaked, mean p_y ~0.9; low-rank: U = H B^T with orthonormal rows of B, so U is the problem's u), and each
row's time process adds the relative (Frobenius) errors of dL/dF (F = A or W: the rows of the 16 most
frequent labels, and whole) and of dL/du (u = U or H) against float64 math on the same 16-bit values.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIGS = [  # (name, low_rank, kind)
    ("megatron dense", False, "megatron"),
    ("torch chunked dense", False, "torch"),
    ("fused dense", False, "fused"),
    ("megatron low-rank (unfused)", True, "megatron"),
    ("torch chunked low-rank", True, "torch"),
    ("fused low-rank", True, "fused"),
    ("fused low-rank (triton)", True, "fused-triton"),
    ("fused dense (triton)", False, "fused-triton"),
    ("liger low-rank", True, "liger"),
    ("liger dense", False, "liger"),
    ("cce low-rank", True, "cce"),
    ("cce dense", False, "cce"),
]
GPU_ONLY = ("fused-triton", "liger", "cce")


# ---------------------------------------------------------------------------------- child side
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _init_megatron(cuda: bool):
    import torch.distributed as dist

    import megatron_bottleneck as mb
    from megatron_bottleneck.base.quiet import quiet_megatron_warnings
    from megatron_bottleneck.integrations.launch import free_port

    quiet_megatron_warnings()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not cuda:
        mb.enable_cpu_mode()
    mb.initialize_parallel(1)


def _matmul_peak(reps: int = 5, n: int = 2048, device: str = "cpu", dtype=None) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _budget(args):
    """The fused op's memory_budget_bytes: --budget-mib, else None (the op's own default)."""
    return None if args.budget_mib is None else int(args.budget_mib * 2**20)


_NO_LAUNCH = ("empty", "empty_like", "empty_strided", "new_empty", "_local_scalar_dense", "lift_fresh",
              "set_", "record_stream")


def count_ops(fn) -> tuple:
    """(result of fn(), aten operators that launch work while it runs): every aten op the dispatcher sees
    below autograd, except views (metadata only) and bare allocations / host reads (``_NO_LAUNCH``)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _NO_LAUNCH:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        out = fn()
    return out, c.n


GPU_SHAPES = "8192,4096,128256;32768,4096,128256;32768,4096,16032;32768,256,128256"
GPU_FREE_GIB = "8,24,64"


def gpu_projection(shapes: str = GPU_SHAPES, free_gib: str = GPU_FREE_GIB, dtype: str = "bfloat16") -> list:
    """The fused torch loop at GPU-sized shapes, run fwd+bwd on ``meta`` tensors (no data, no GPU) along the
    CUDA path: per (T, k, V_local) and budget (the former 64 MiB, and ``memory_budget_for("cuda", free)``
    per free-memory figure) the chunk count and the operators (about kernel launches) per step, and the
    chunk's working memory (the float32 [T, C] buffer and its 16-bit cast)."""
    import torch

    from megatron_bottleneck.ops import ChunkLoopPlan, chunk_count, choose_chunk_size, linear_cross_entropy
    from megatron_bottleneck.ops import memory_budget_for

    dt = getattr(torch, dtype)
    assert ChunkLoopPlan.for_device("meta", 1).fp32_output_mm, "this torch has no float32-output 16-bit mm"
    rows = []
    for shape in shapes.split(";"):
        t, k, v = (int(x) for x in shape.split(","))
        budgets = [("64 MiB (before)", 64 * 2**20)]
        budgets += [(f"rule, {g} GiB free", memory_budget_for("cuda", int(float(g) * 2**30)))
                    for g in free_gib.split(",")]
        for label, budget in budgets:
            u = torch.empty(t, k, dtype=dt, device="meta", requires_grad=True)
            w = torch.empty(v, k, dtype=dt, device="meta", requires_grad=True)
            y = torch.empty(t, dtype=torch.long, device="meta")
            g = torch.empty(t, dtype=torch.float32, device="meta")

            def step():
                linear_cross_entropy(u, w, y, memory_budget_bytes=budget, check_labels=False).backward(g)

            _, ops = count_ops(step)
            c = choose_chunk_size(t, v, budget)
            rows.append(dict(T=t, k=k, V_local=v, dtype=dtype, budget=label, budget_mib=budget / 2**20,
                             chunk_rows=c, chunks=chunk_count(t, v, budget), ops_per_step=ops,
                             chunk_mem_mib=t * c * (4 + dt.itemsize) / 2**20))
    return rows


def child(args) -> dict:
    import gc

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = args.device, getattr(torch, args.dtype)
    if args.child == "peak":
        if dev == "cuda":
            return dict(matmul_peak_gflops=_matmul_peak(n=8192, device=dev, dtype=dtype))
        return dict(matmul_peak_gflops=_matmul_peak())
    name, low_rank, kind = CONFIGS[[c[0] for c in CONFIGS].index(args.child)]
    t, d, v, r = args.T, args.D, args.V, args.rank
    if kind in GPU_ONLY and dev != "cuda":
        return dict(name=name, rank=r if low_rank else None, available=False, why="GPU only")
    gen = torch.Generator().manual_seed(0)

    def param(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dtype).requires_grad_()

    if args.accuracy:  # trained-like: Zipfian labels, peaked logits
        from megatron_bottleneck.ops.reference import peaked_zipf_problem

        x0, f0, y = peaked_zipf_problem(t, r if low_rank else d, v, dtype=torch.float64)
        y = y.to(dev)
        if low_rank:  # U = H B^T with B's rows orthonormal: H = U B
            q = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]  # [D, r]
            b, h, a = q.t(), x0 @ q.t(), f0
        else:
            h, w = x0, f0

        def leaf(x):
            return x.to(device=dev, dtype=dtype).requires_grad_()

        h = leaf(h)
        if low_rank:
            a, b = leaf(a), leaf(b)
        else:
            w = leaf(w)
    else:
        h = param(t, d)
        y = torch.randint(0, v, (t,), generator=gen).to(dev)
        if low_rank:
            a = param(v, r, std=(0.02 / r**0.5) ** 0.5)
            b = param(r, d, std=(0.02 / r**0.5) ** 0.5)
        else:
            w = param(v, d, std=0.02)

    if kind == "megatron":
        _init_megatron(dev == "cuda")
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def loss_fn(x, f, labels):  # [T, k] -> Megatron's [s, b, V] layout with b = 1
            return vocab_parallel_cross_entropy((x @ f.t()).unsqueeze(1), labels.unsqueeze(1)).mean()
    elif kind == "torch":
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return dict(name=name, rank=r if low_rank else None, available=False)
        opts = torch.nn.LinearCrossEntropyOptions()

        def loss_fn(x, f, labels):
            return F.linear_cross_entropy(x, f, labels, reduction="mean", options=opts)
    elif kind in ("fused", "fused-triton"):
        from megatron_bottleneck.ops import linear_cross_entropy

        kernel = "triton" if kind == "fused-triton" else "torch"

        def loss_fn(x, f, labels):
            return linear_cross_entropy(x, f, labels, memory_budget_bytes=_budget(args), kernel=kernel).mean()
    elif kind == "liger":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return dict(name=name, rank=r if low_rank else None, available=False, why="pip install liger-kernel")
        liger = LigerFusedLinearCrossEntropyLoss()

        def loss_fn(x, f, labels):
            out = liger(f, x, labels)
            return out[0] if isinstance(out, tuple) else out
    else:  # cce
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            return dict(name=name, rank=r if low_rank else None, available=False, why="pip install cut-cross-entropy")

        def loss_fn(x, f, labels):
            return cce(x, f, labels)

    grad_u = {}

    def step():
        if low_rank:
            x = h @ b.t()
            x.retain_grad()
            loss = loss_fn(x, a, y)
        else:
            x = h
            loss = loss_fn(h, w, y)
        loss.backward()
        grad_u["u"] = x
        return float(loss)

    loss0 = step()  # warm-up; allocates the persistent .grad buffers
    gc.collect()
    mem = None
    if dev == "cuda":  # memory and time from the same process
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif args.measure == "memory":
        if not _reset_peak():
            return dict(name=name, rank=r if low_rank else None, mem_mib=None)
        base = _status_kib("VmRSS")
        step()
        return dict(name=name, rank=r if low_rank else None, mem_mib=(_status_kib("VmHWM") - base) / 1024)
    # this process, right before its timed steps
    peak = _matmul_peak(reps=3, n=8192, device=dev, dtype=dtype) if dev == "cuda" else _matmul_peak(reps=3, n=1024)
    times, cpu = [], []
    for _ in range(args.reps):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    flops = 6 * t * r * (d + v) if low_rank else 6 * t * v * d
    errors = {}
    if args.accuracy:  # one more step from zeroed gradients, against float64 on the same values
        from megatron_bottleneck.ops.reference import gradient_errors, unfused_loss

        f = a if low_rank else w
        for p_ in (h, f) + ((b,) if low_rank else ()):
            p_.grad = None
        step()
        got = (grad_u["u"].grad, f.grad)
        u64 = (h.detach().double() @ b.detach().double().t()) if low_rank else h.detach().double()
        u64.requires_grad_()
        f64 = f.detach().double().requires_grad_()
        unfused_loss(u64, f64, y).mean().backward()
        errors = {f"err_{key}": val for key, val in gradient_errors(got, (u64.grad, f64.grad), y.cpu()).items()}
        z = u64.detach() @ f64.detach().t()
        errors["mean_p_y"] = float(torch.softmax(z, 1).gather(1, y[:, None]).mean())
        errors["top_share"] = float(torch.bincount(y).max()) / t
    for p_ in (h,) + ((a, b) if low_rank else (w,)):
        p_.grad = None
    _, ops = count_ops(step)
    chunks = 1
    if kind == "fused":
        from megatron_bottleneck.ops import ChunkLoopPlan, chunk_count, chunk_row_bytes

        plan = ChunkLoopPlan.for_device(torch.device(dev), _budget(args))
        chunks = chunk_count(t, v, plan.memory_budget_bytes,
                             chunk_row_bytes(dtype, r if low_rank else d, plan.fp32_output_mm))
    elif kind != "megatron":
        chunks = None  # the library's own chunking
    med = statistics.median(times)
    best = min(times)
    return dict(
        name=name,
        kind=kind,
        low_rank=low_rank,
        rank=r if low_rank else None,
        available=True,
        loss=loss0,
        time_s=med,
        time_min_s=best,
        times_s=times,
        cpu_min_s=min(cpu),
        cpu_s=cpu,
        gflops=flops / best / 1e9,
        row_matmul_peak_gflops=peak,
        threads=torch.get_num_threads(),
        flops=flops,
        chunks=chunks,
        ops_per_step=ops,
        **errors,
        **({"mem_mib": mem} if mem is not None else {}),
    )


# --------------------------------------------------------------------------------- parent side
def _child_cmd(args, name, rank, measure):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--T", str(args.T), "--D", str(args.D),
           "--V", str(args.V), "--reps", str(args.reps), "--threads", str(args.threads), "--measure", measure,
           "--device", args.device, "--dtype", args.dtype] + (["--accuracy"] if args.accuracy else [])
    if args.budget_mib is not None:
        cmd += ["--budget-mib", str(args.budget_mib)]
    return cmd + (["--rank", str(rank)] if rank is not None else [])


def run_child(args, name, rank=None) -> dict:
    """Time in one fresh process (default allocator), memory in another (large blocks mmapped, so
    that freed memory leaves RSS and the peak above the baseline is the step's live working set)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("MB_FUSED_KERNEL", None)  # the row's kernel= argument decides
    res = {}
    for measure, extra in (("time", {}), ("memory", dict(MALLOC_MMAP_THRESHOLD_="131072",
                                                         MALLOC_TRIM_THRESHOLD_="131072"))):
        if (name == "peak" or args.device == "cuda") and measure == "memory":
            break
        out = subprocess.run(_child_cmd(args, name, rank, measure), env=dict(env, **extra),
                             capture_output=True, text=True)
        if out.returncode:
            return dict(name=name, rank=rank, available=False, error=out.stderr.strip().splitlines()[-1:])
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if got.get("available") is False:
            return got
        res.update(got)
    return res


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T=512, D=256, V=8192, ranks 32,64,128")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--D", type=int, default=1024)
    p.add_argument("--V", type=int, default=49152)
    p.add_argument("--ranks", default="32,64,128,512")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--budget-mib", type=float, default=None,
                   help="fused op's memory_budget_bytes, MiB (default: the op's, 16 on CPU per-token, else 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--accuracy", action="store_true", default=None,
                   help="trained-like data and gradient errors against float64 (default: on for 16-bit dtypes)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "head_loss.json"))
    p.add_argument("--merge", default="", help="JSON of an earlier run: add its rows for configs not run now")
    p.add_argument("--only", default="", help="comma list: run only configs whose name starts with one of these")
    p.add_argument("--gpu-shapes", default=GPU_SHAPES,
                   help="T,k,V_local;... of the GPU projection of the fused torch loop (meta tensors); '' skips it")
    p.add_argument("--gpu-free-gib", default=GPU_FREE_GIB,
                   help="free GPU memory figures (GiB) for the projection's budget rule, comma list")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="time", choices=("time", "memory"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None or args.dtype is None:
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.accuracy is None:
        args.accuracy = args.dtype != "float32"
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.T, args.D, args.V, args.ranks = 512, 256, 8192, "32,64,128"
    ranks = [int(x) for x in args.ranks.split(",") if int(x) < args.D]
    peak = run_child(args, "peak").get("matmul_peak_gflops")
    rows = []
    jobs = [(name, r) for r in ranks for name, low_rank, _ in CONFIGS if low_rank]
    jobs += [(name, None) for name, low_rank, _ in CONFIGS if not low_rank]
    if args.only:
        jobs = [j for j in jobs if any(j[0].startswith(w.strip()) for w in args.only.split(","))]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for name, r in jobs:
        rows.append(run_child(args, name, r))
        print(f"  done: {name}" + (f" r={r}" if r else "") + f": {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        with open(args.out + ".partial", "w") as f:
            json.dump(dict(T=args.T, D=args.D, V=args.V, matmul_peak_gflops=peak, rows=rows), f, indent=1)

    if args.merge:  # rows of configurations not run now, from an earlier run with the same shape
        with open(args.merge) as f:
            old = json.load(f)
        if (old["T"], old["D"], old["V"]) != (args.T, args.D, args.V):
            raise SystemExit(f"--merge {args.merge} has another shape; run it again or drop --merge.")
        have = {(x["name"], x.get("rank")) for x in rows}
        rows += [x for x in old["rows"] if (x["name"], x.get("rank")) not in have]
        order = [(n, r) for r in ranks for n, lr, _ in CONFIGS if lr] + [(n, None) for n, lr, _ in CONFIGS if not lr]
        rows.sort(key=lambda x: order.index((x["name"], x.get("rank"))) if (x["name"], x.get("rank")) in order else 1e9)

    def ref_for(row, target=None):
        if target is None:
            target = "megatron dense" if not row.get("low_rank") else "megatron low-rank (unfused)"
        rank = row.get("rank") if target != "megatron dense" else None
        return next((x for x in rows if x.get("name") == target and x.get("rank") == rank and x.get("available")), None)

    key = "cpu_min_s" if args.device == "cpu" else "time_min_s"  # the time the ratios use
    dense = ref_for({}, "megatron dense")
    header = (f"T={args.T} D={args.D} V={args.V} {args.dtype} on {args.device}, {args.reps} timed fwd+bwd steps "
              f"after a warm-up, torch threads {rows[0].get('threads', '?') if rows else '?'}; matmul peak at start "
              f"{fmt(peak, '.1f')} GFLOP/s; ratios use {'process CPU' if key == 'cpu_min_s' else 'wall'} time")
    acc = bool(args.accuracy)
    if acc:
        header += ("; gradient errors against float64 on Zipfian labels / peaked logits (relative Frobenius: "
                   "dL/dF of the 16 most frequent rows, whole dL/dF, dL/du)")
    lines = [header, "",
             "| config | r | wall min (s) | wall median (s) | CPU min (s) | x megatron (time) | working mem (MiB) "
             "| x megatron | GFLOP/s (wall min) | row's matmul peak | % of it | x ideal | chunks | ops/step |"
             + (" err dF top-16 | err dF | err du |" if acc else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if acc else "")]
    for row in rows:
        r = "" if row.get("rank") is None else str(row["rank"])
        if not row.get("available"):
            why = row.get("why") or " ".join(row.get("error") or [])
            lines.append(f"| {row['name']} | {r} | n/a{': ' + why if why else ''} | | | | | | | | | | | |"
                         + (" | | |" if acc else ""))
            continue
        ref = ref_for(row)
        tr = row[key] / ref[key] if ref else None
        mr = row["mem_mib"] / ref["mem_mib"] if ref and row.get("mem_mib") is not None and ref.get("mem_mib") else None
        rp = row.get("row_matmul_peak_gflops")
        pct = 100 * row["gflops"] / rp if rp else None
        ideal = None
        if dense and row.get("flops") and dense.get("flops"):
            ideal = (row[key] / dense[key]) / (row["flops"] / dense["flops"])
        lines.append(f"| {row['name']} | {r} | {row['time_min_s']:.3f} | {row['time_s']:.3f} | "
                     f"{row['cpu_min_s']:.3f} | {fmt(tr, '.2f')} | "
                     f"{fmt(row.get('mem_mib'), '.0f')} | {fmt(mr, '.3f')} | {row['gflops']:.1f} | "
                     f"{fmt(rp, '.0f')} | {fmt(pct, '.0f')} | {fmt(ideal, '.2f')} | "
                     f"{fmt(row.get('chunks'), 'd')} | {fmt(row.get('ops_per_step'), 'd')} |"
                     + (f" {fmt(row.get('err_dw_top'), '.2e')} | {fmt(row.get('err_dw'), '.2e')} | "
                        f"{fmt(row.get('err_du'), '.2e')} |" if acc else ""))
    gpu = gpu_projection(args.gpu_shapes, args.gpu_free_gib) if args.gpu_shapes else []
    if gpu:
        lines += ["", "Fused torch loop at GPU-sized shapes, bfloat16, CUDA path, counted on meta tensors (no GPU "
                  "ran): chunks per pass and operators (~ kernel launches) per fwd+bwd step", "",
                  "| T | k | V_local | budget | budget (MiB) | rows per chunk | chunks | ops/step | chunk buffers (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in gpu:
            lines.append(f"| {g['T']} | {g['k']} | {g['V_local']} | {g['budget']} | {g['budget_mib']:.0f} | "
                         f"{g['chunk_rows']} | {g['chunks']} | {g['ops_per_step']} | {g['chunk_mem_mib']:.0f} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(T=args.T, D=args.D, V=args.V, reps=args.reps, budget_mib=args.budget_mib,
                       device=args.device, dtype=args.dtype, accuracy=bool(args.accuracy),
                       matmul_peak_gflops=peak, rows=rows, gpu_projection=gpu, table="\n".join(lines),
                       command=" ".join(sys.argv), merged_from=args.merge or None), f, indent=1)
    if os.path.exists(args.out + ".partial"):
        os.remove(args.out + ".partial")


if __name__ == "__main__":
    main()
