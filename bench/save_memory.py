"""Peak host memory per rank while a checkpoint is saved (and loaded), per distributed-optimizer format.

    python bench/save_memory.py [--dp 2 4] [--hidden 512] [--layers 8] [--json bench/results/save_memory.json]

CPU ranks on gloo (``megatron_bottleneck.launch``), TP = PP = 1, DP = each ``--dp``: the trainer builds a GPT
model with the distributed optimizer and trains one step (so Adam holds its state), then each rank saves the
model + optimizer with Megatron's distributed checkpointing (synchronously, as ``CheckpointWriter`` does) in:

- ``dp_reshardable``: each DP rank's buffer shard as it is (this package's default, Megatron-LM's);
- ``fully_reshardable``: model-space tensors, megatron-core's memory-efficient variant (gloo gather onto DP
  rank 0 only): what ``checkpoint.optimizer_format=fully_reshardable`` saves now;
- ``fully_reshardable (all-gather)``: megatron-core's default variant (all-gather onto every rank): the old
  default of this package;

and loads each checkpoint back into the optimizer; ``model only`` saves and loads the model alone, the baseline
the optimizer's part is read against. Memory: the kernel's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` right before each save or load, glibc told to return large blocks at once),
minus the resident set just before. "state dict" is the part of the save before writing starts (Megatron's
sharded state dict: the gather happens there, so an asynchronous save does not hide it); "save" is the whole
save. Sizes they are set against: this rank's optimizer shard (main weights + exp_avg + exp_avg_sq of the
parameters it owns, 3 fp32 values each) and the whole optimizer state (every rank's shard: 3 fp32 values per
parameter). Prints one table and writes the JSON (one row per DP size x format x rank).
"""
import argparse
import ctypes
import gc
import json
import os
import shutil
import tempfile
import time

import megatron_bottleneck as mb

FORMATS = {  # name: (checkpoint.optimizer_format, megatron-core's memory-efficient flag); None: no optimizer
    "model only": (None, None),
    "dp_reshardable": ("dp_reshardable", True),
    "fully_reshardable": ("fully_reshardable", True),
    "fully_reshardable (all-gather)": ("fully_reshardable", False),
}
MIB = 2 ** 20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) := the current one


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _settle(libc) -> int:
    gc.collect()
    libc.malloc_trim(0)
    return _rss_now()


def rank_run(data, root: str, hidden: int, layers: int, formats):
    """On each rank: train one step, then per format save and load, recording this rank's memory."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_bottleneck.train import Trainer, TrainConfig
    from megatron_bottleneck.train.checkpoint import _full_state, _load_optimizer

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD fixed at 64 KiB: freed tensors go back to the kernel
    cfg = TrainConfig.from_dict({
        "model": {"vocab_size": 64, "hidden_size": hidden, "num_attention_heads": 8, "num_layers": layers,
                  "seq_length": 8, "head_rank": 8},
        "parallel": {"tensor_model_parallel_size": 1, "distributed_optimizer": True},
        "train": {"train_steps": 1, "global_batch_size": 8, "micro_batch_size": 1, "eval_interval": 0,
                  "log_interval": 1},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "logging": {"dir": os.path.join(root, "logs"), "console": False, "tensorboard": False},
    })
    trainer = Trainer(cfg)
    trainer.train()
    opt = trainer.optimizer
    subs = getattr(opt, "chained_optimizers", [opt])
    shard = sum(st["exp_avg"].numel() for s in subs for st in s.optimizer.state.values())
    params = sum(p.numel() for m in trainer.models for p in m.module.parameters())
    chunks = [m.module for m in trainer.models]
    rank = dist.get_rank()
    rows = []
    for name in formats:
        fmt, efficient = FORMATS[name]
        path = os.path.join(root, name.replace(" ", "_").replace("(", "").replace(")", ""))
        if rank == 0:
            os.makedirs(path)
        dist.barrier()
        before = _settle(libc)
        _reset_peak()
        t0 = time.perf_counter()
        optimizer = opt if fmt is not None else None
        state = _full_state(chunks, optimizer, is_loading=False, fmt=fmt, mem_efficient=efficient)
        state_dict_peak = _peak()
        dist_checkpointing.save(state, path)
        save_peak = _peak()
        save_s = time.perf_counter() - t0
        del state
        dist.barrier()
        before_load = _settle(libc)
        _reset_peak()
        t0 = time.perf_counter()
        loaded = dist_checkpointing.load(_full_state(chunks, optimizer, is_loading=True, fmt=fmt), path)
        if optimizer is not None:
            _load_optimizer(optimizer, loaded["optimizer"], fmt)
        load_peak = _peak()
        load_s = time.perf_counter() - t0
        del loaded
        dist.barrier()
        rows.append({"format": name, "optimizer_format": fmt, "mem_efficient": efficient if fmt == "fully_reshardable"
                     else None, "rank": rank, "dp": dist.get_world_size(), "params": params, "shard_numel": shard,
                     "shard_bytes": 3 * 4 * shard, "full_state_bytes": 3 * 4 * params,
                     "rss_before": before, "state_dict_growth": state_dict_peak - before,
                     "save_growth": save_peak - before, "load_growth": load_peak - before_load,
                     "save_s": save_s, "load_s": load_s})
    return rows


def table(rows) -> str:
    lines = ["| DP | format | rank | optimizer shard (MiB) | whole optimizer (MiB) | state dict peak (MiB) | "
             "save peak (MiB) | save peak / shard | save peak / whole | load peak (MiB) | load peak / whole |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dp']} | {r['format']} | {r['rank']} | {r['shard_bytes'] / MIB:.1f} | "
            f"{r['full_state_bytes'] / MIB:.1f} | {r['state_dict_growth'] / MIB:.1f} | {r['save_growth'] / MIB:.1f} | "
            f"{r['save_growth'] / r['shard_bytes']:.2f} | {r['save_growth'] / r['full_state_bytes']:.2f} | "
            f"{r['load_growth'] / MIB:.1f} | {r['load_growth'] / r['full_state_bytes']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes (one rank each)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--json", default="bench/results/save_memory.json")
    args = ap.parse_args(argv)
    from megatron_bottleneck.data import SpamLangConfig, generate_spamlang

    work = tempfile.mkdtemp(prefix="save-memory-")
    try:
        data = generate_spamlang(SpamLangConfig(64, 8, 400, seed=3), os.path.join(work, "spam"))
        rows = []
        for dp in args.dp:
            root = os.path.join(work, f"dp{dp}")
            per_rank = mb.launch(rank_run, dp, data, root, args.hidden, args.layers, args.formats, timeout=1800)
            rows += sorted((r for rank in per_rank for r in rank), key=lambda r: (args.formats.index(r["format"]),
                                                                                   r["rank"]))
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"hidden": args.hidden, "layers": args.layers, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
