"""Rank functions for tests/distributed/test_convert_head.py (real Megatron training on CPU ranks)."""
import contextlib
import io
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_bottleneck.train import Trainer, TrainConfig, load_model_only
from megatron_bottleneck.train.trainer import build_models


def dense_config(log_dir: str, data: Dict, ckpt: str, steps: int, tp: int = 2, parallel: Optional[Dict] = None,
                 **train) -> TrainConfig:
    """The tiny model of the trainer tests (V=64, D=16) with Megatron's dense head, no probe."""
    return TrainConfig.from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "seq_length": 8},
        "parallel": {"tensor_model_parallel_size": tp, **(parallel or {})},
        "train": {"train_steps": steps, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 0,
                  "log_interval": 100, **train},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "data": {"train_prefix": data["train_prefix"], "valid_prefix": data["valid_prefix"]},
        "checkpoint": {"dir": ckpt, "save_interval": 0, "keep_last": 1},
        "logging": {"dir": log_dir, "console": False},
    })


def train_dense(log_dir: str, data: Dict, ckpt: str, steps: int) -> Dict:
    return {"losses": [h["loss"] for h in Trainer(dense_config(log_dir, data, ckpt, steps)).train()["history"]]}


def _batches():
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 64, (4, 8, 9), generator=gen)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _losses(chunk):
    """Per-token losses ``[4, 8, 8]`` of fixed batches (vocab-parallel cross-entropy: the same on every TP rank)."""
    pos = torch.arange(8).unsqueeze(0).expand(8, -1)
    with torch.no_grad():
        return torch.stack([chunk(x, pos, None, labels=y).float() for x, y in _batches()])


def _gathered(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a vocab-sharded (dim 0) parameter, over the TP group (here: the world)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def _model(path: str):
    cfg = TrainConfig.load(os.path.join(path, "config.yaml"))
    _, (chunk,) = build_models(cfg)
    load_model_only(path, [chunk])
    chunk.eval()
    return chunk


def _compare_optimizer_state(loaded, source):
    """The converted checkpoint's optimizer state (``loaded``) against the dense run's (``source``, head excluded):
    {name: (main weight, exp_avg, exp_avg_sq, step)} each."""
    return {"names": sorted(loaded), "source_names": sorted(source),
            "kept_max_diff": max(float((loaded[k][j] - source[k][j]).abs().max()) for k in source for j in range(3)),
            "kept_steps": sorted({loaded[k][3] for k in source} | {source[k][3] for k in source}),
            "head": {k: [float(t.abs().max()) for t in v[1:3]] + [v[3]] for k, v in loaded.items() if k not in source},
            "moments_nonzero": min(float(source[k][1].abs().max()) for k in source)}


def _optimizer_state(trainer) -> Dict:
    """``{name: (main, exp_avg, exp_avg_sq, step)}`` of this rank's parameters in the trainer's optimizer (loaded)."""
    from megatron_bottleneck.train.checkpoint import adam_state

    out = {}
    for name, param in trainer.models[0].module.named_parameters():
        found = adam_state(trainer.optimizer, param)
        if found is not None:
            main, st = found
            out[name] = (main.detach().clone().flatten(), st["exp_avg"].detach().clone().flatten(),
                         st["exp_avg_sq"].detach().clone().flatten(), float(st["step"]))
    return out


def check_and_resume(dense_path: str, converted: Dict[int, str], full_rank_out: str, resume_dir: str, data: Dict,
                     steps: int) -> Dict:
    """The r = D conversion of ``dense_path`` into ``full_rank_out`` (the command's rank function, no launch of its
    own); at TP=2: the dense checkpoint's and each converted one's losses on fixed batches, full W, A, B and every
    other weight's difference; the optimizer state the trainer loads from the dense checkpoint and from a copy of
    ``converted[min r]`` (``resume_dir/ckpt``), which it then resumes at the saved TP=2 for 2 more steps."""
    from megatron_bottleneck.convert import _convert_rank
    from megatron_bottleneck.integrations.parallel import initialize_parallel

    sums, info = _convert_rank(dense_path, 16, full_rank_out)
    converted = {16: info["path"], **converted}
    initialize_parallel(2, 1, seed=1)
    dense = _model(dense_path)
    out = {"dense_losses": _losses(dense), "w": _gathered(dense.output_layer.weight), "converted": converted}
    dense_state = {k: v for k, v in dense.state_dict().items() if not k.startswith("output_layer")}
    for r, path in converted.items():
        low = _model(path)
        state = low.state_dict()
        out[r] = {"losses": _losses(low), "a": _gathered(low.output_layer.weight),
                  "b": low.output_layer.input_proj.detach().clone(), "head": type(low.output_layer).__name__,
                  "others": max(float((state[k].float() - v.float()).abs().max()) for k, v in dense_state.items()
                                if torch.is_tensor(v) and torch.is_tensor(state.get(k)))}
    r = min(converted)
    # the source's optimizer state as the trainer resumes it (an independent load of the dense checkpoint)
    src_cfg = TrainConfig.load(os.path.join(dense_path, "config.yaml"),
                               [f"logging.dir={resume_dir}/src_logs", f"checkpoint.dir={os.path.dirname(dense_path)}"])
    source = {k: v for k, v in _optimizer_state(Trainer(src_cfg)).items() if not k.startswith("output_layer.")}
    cfg = TrainConfig.load(os.path.join(converted[r], "config.yaml"),
                           [f"train.train_steps={steps}", "checkpoint.scheduler=config",
                            f"logging.dir={resume_dir}/logs", f"checkpoint.dir={resume_dir}/ckpt"])
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        trainer = Trainer(cfg)
    loaded = _optimizer_state(trainer)
    out["optimizer"] = _compare_optimizer_state(loaded, source)
    # the converted checkpoint loaded independently (a plain model, the trainer's TP=2) on the first resumed step's
    # micro-batches: the step's loss, taken before its update
    _, (ref,) = build_models(TrainConfig.load(os.path.join(converted[r], "config.yaml")))
    load_model_only(converted[r], [ref])
    ref.eval()
    stream = trainer.batches("train", trainer.consumed)
    with torch.no_grad():
        firsts = []
        for _ in range(trainer.num_micro):
            batch = next(stream)
            pos = torch.arange(8).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
            firsts.append(ref(batch["tokens"], pos, None, labels=batch["labels"]).float().mean().double())
    result = trainer.train()
    out["resume"] = {"console": console.getvalue(), "reference_first_loss": float(sum(firsts) / len(firsts)),
                     "steps": [h["step"] for h in result["history"]],
                     "losses": [h["loss"] for h in result["history"]],
                     "head": type(trainer.models[0].module.output_layer).__name__,
                     "rank": trainer.models[0].module.output_layer.rank}
    # without the distributed optimizer, in bf16 (Megatron-Core's Float16OptimizerWithFloat16Params: fp32 main
    # weights beside the bf16 model, state by parameter): a 2-step dense run at TP=2, converted at r = 4, resumed by
    # a trainer that only loads it; its state against the run's own
    nodist = os.path.join(resume_dir, "nodist")
    trained = Trainer(dense_config(f"{nodist}/logs", data, f"{nodist}/dense", 2, precision="bf16",
                                   parallel={"distributed_optimizer": False}))
    trained.train()
    source = {k: v for k, v in _optimizer_state(trained).items() if not k.startswith("output_layer.")}
    _convert_rank(os.path.join(nodist, "dense", "iter_0000002"), 4, f"{nodist}/r4")
    loaded = _optimizer_state(Trainer(TrainConfig.load(f"{nodist}/r4/iter_0000002/config.yaml",
                                                       [f"logging.dir={nodist}/r4_logs"])))
    out["nodist"] = _compare_optimizer_state(loaded, source)
    out["all_sums"] = [None] * dist.get_world_size()
    dist.all_gather_object(out["all_sums"], sums)
    return out if dist.get_rank() == 0 else None
