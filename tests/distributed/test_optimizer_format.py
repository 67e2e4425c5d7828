"""The distributed optimizer's two checkpoint formats saved and loaded for real (trainer, gloo ranks, several
padded DDP buckets per rank), on the installed megatron-core (0.16.1 in the Python 3.11 lane, 0.19.2 in the 3.12
lane): after a save and a resume, at the same layout and at another DP size (and, for fully_reshardable, with
other DDP buckets), every parameter's main weight and Adam moments equal the saved ones bit for bit, and its Adam
step is the saved count; dp_reshardable with other buckets is one CheckpointError line. The fully_reshardable case
runs this package's two workarounds of megatron-core on its torch-Adam path (checkpoint.py: the world tensors put
at the buffer's offsets for the save, the 'step' handed to the load); the version guard refuses the format
outside the versions they were verified with (tests/unit/test_resume_checks.py)."""
import os
from typing import Dict

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.errors import CheckpointError
from tests.distributed import trainer_ranks as tr


def model_space_state(trainer) -> Dict[str, Dict]:
    """Per parameter name: the distributed optimizer's main weight, exp_avg and exp_avg_sq as whole flattened
    tensors (every DP rank's shard put at its range; TP = PP = 1, so the world is the DP group), and ``steps``,
    its Adam step and its group's step count where the group has one (after a load); plus ``buckets``, the most buckets of one buffer."""
    import torch.distributed as dist

    names = {p: n for m in trainer.models for n, p in m.module.named_parameters()}
    pieces, buckets = [], 0
    for sub in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = sub.optimizer
        for gbuf_idx, per_dtype in enumerate(sub.gbuf_ranges):
            buckets = max(buckets, len(sub.buffers[gbuf_idx].buckets))
            for per_bucket in per_dtype.values():
                for ranges in per_bucket:
                    for model_param, r in ranges["param_map"].items():
                        gi, go = sub.model_param_group_index_map[model_param]
                        main = inner.param_groups[gi]["params"][go]
                        st = inner.state[main]
                        pieces.append((names[model_param], model_param.numel(), r["param"].start, r["param"].end,
                                       {"param": main.detach().clone(), "exp_avg": st["exp_avg"].clone(),
                                        "exp_avg_sq": st["exp_avg_sq"].clone()},
                                       float(st["step"]), inner.param_groups[gi].get("step")))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    out: Dict[str, Dict] = {}
    for name, numel, start, end, tensors, step, group_step in (p for rank in gathered for p in rank):
        entry = out.setdefault(name, {k: torch.full((numel,), float("nan")) for k in tensors} | {"steps": set()})
        for k, v in tensors.items():
            entry[k][start:end] = v
        entry["steps"] |= {step} | ({float(group_step)} if group_step is not None else set())
    return {"params": out, "buckets": buckets}


def round_trip_rank(log_dir: str, data: Dict, ckpt: str, fmt: str, steps: int, bucket: int = 1000) -> Dict:
    """Train to ``steps`` (saving there, synchronously) unless ``ckpt`` already holds that step, in which case
    the trainer only resumes from it; then this run's optimizer state in model space. ``bucket``: parameters per
    DDP bucket. A CheckpointError comes back as ``{"error": its line}``."""
    cfg = tr.config(log_dir, data, ckpt=ckpt, steps=steps, probe={},
                    parallel={"tensor_model_parallel_size": 1, "distributed_optimizer": True,
                              "ddp_bucket_size": bucket},
                    checkpoint={"optimizer_format": fmt, "async_save": False, "save_interval": 0})
    try:
        trainer = tr.RecordingTrainer(cfg)
    except CheckpointError as e:
        return {"error": str(e)}
    resumed = trainer.iteration
    if resumed < steps:
        trainer.train()
    return {"resumed_at": resumed, **model_space_state(trainer)}


def assert_same_state(saved: Dict, resumed: Dict) -> None:
    assert saved["params"].keys() == resumed["params"].keys()
    for name, a in saved["params"].items():
        b = resumed["params"][name]
        for k in ("param", "exp_avg", "exp_avg_sq"):
            assert not torch.isnan(a[k]).any(), (name, k)  # every element held by some rank
            assert torch.equal(a[k], b[k]), (name, k)
        assert b["steps"] == a["steps"], name


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_a_resumed_optimizer_holds_the_saved_state(tmp_path, spamlang, fmt):
    ckpt, logs = str(tmp_path / "ckpt"), str(tmp_path / "logs")
    saved = mb.launch(round_trip_rank, 2, logs, spamlang, ckpt, fmt, 3, timeout=600)[0]
    assert saved["resumed_at"] == 0 and saved["buckets"] > 1  # several buckets, the last ones padded
    params = saved["params"]
    assert all(v["steps"] == {3.0} for v in params.values())
    assert all(v["exp_avg"].abs().sum() > 0 for v in params.values())  # a state a failed load could not fake
    with open(os.path.join(ckpt, "iter_0000003", "layout.json")) as f:
        assert f'"optimizer_format": "{fmt}"' in f.read()
    same = mb.launch(round_trip_rank, 2, logs, spamlang, ckpt, fmt, 3, timeout=600)[0]  # DP = 2 again
    assert same["resumed_at"] == 3
    assert_same_state(saved, same)
    one = mb.launch(round_trip_rank, 1, logs, spamlang, ckpt, fmt, 3, timeout=600)[0]  # DP = 1
    assert one["resumed_at"] == 3
    assert_same_state(saved, one)
    # other DDP buckets (2000 parameters each): the dp_reshardable state is laid out by bucket, so one line
    # before anything loads (Megatron would stop on an assertion); the model-space state loads as it is
    other = mb.launch(round_trip_rank, 2, logs, spamlang, ckpt, fmt, 3, 2000, timeout=600)
    if fmt == "dp_reshardable":
        for r in other:
            assert "\n" not in r["error"] and "laid out by DDP bucket" in r["error"]
            assert "saved 1000, now 2000" in r["error"] and "Resume with parallel.ddp_bucket_size=1000" in r["error"]
    else:
        assert other[0]["resumed_at"] == 3
        assert_same_state(saved, other[0])
