"""What a resume accepts and refuses (``checkpoint.check_layout`` on a checkpoint's layout.json): one
CheckpointError line each, before anything loads."""
import json
import os

import pytest

from megatron_bottleneck.base.errors import CheckpointError
from megatron_bottleneck.train.checkpoint import FULLY_RESHARDABLE_SHIMMED, check_layout, check_optimizer_format

MODEL = {"model.num_layers": 2, "model.hidden_size": 16, "model.head_rank": 8, "model.fused_loss": False,
         "train.precision": "fp32"}


def layout(tp=2, pp=1, vpp=None, dp=2, dist_opt=True, fmt="fully_reshardable", **model):
    return {"world_size": tp * pp * dp, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp, "data_parallel_size": dp, "distributed_optimizer": dist_opt,
            "optimizer_format": fmt if dist_opt else None, "model": {**MODEL, **model}}


def saved(tmp_path, lay):
    path = str(tmp_path / "iter_0000007")
    os.makedirs(path)
    if lay is not None:
        with open(os.path.join(path, "layout.json"), "w") as f:
            json.dump(lay, f)
    return path


def refused(path, now) -> str:
    with pytest.raises(CheckpointError) as e:
        check_layout(path, now)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot resume from {path}: ")
    return str(e.value)


def test_the_same_layout_resumes_with_per_rank_state(tmp_path):
    assert check_layout(saved(tmp_path, layout()), layout()) is True


@pytest.mark.parametrize("now", [layout(dp=1), layout(tp=1, dp=2), layout(tp=1, dp=4), layout(tp=2, pp=2, dp=1),
                                 layout(fmt="dp_reshardable")])
def test_fully_reshardable_state_reshards_tp_pp_and_dp(tmp_path, now):
    assert check_layout(saved(tmp_path, layout()), now) is (now["world_size"] == 4 and now["tensor_model_parallel_size"] == 2 and now["pipeline_model_parallel_size"] == 1)


def test_dp_reshardable_state_reshards_dp_only(tmp_path):
    path = saved(tmp_path, layout(fmt="dp_reshardable"))
    assert check_layout(path, layout(dp=1)) is False
    msg = refused(path, layout(tp=1, dp=4))
    assert "dp_reshardable format" in msg and "tensor_model_parallel_size: saved 2, now 1" in msg
    assert "checkpoint.optimizer_format=fully_reshardable" in msg


def test_a_checkpoint_older_than_the_format_field_is_dp_reshardable(tmp_path):
    old = layout()
    del old["optimizer_format"], old["model"]
    path = saved(tmp_path, old)
    assert check_layout(path, layout(dp=1)) is False
    assert "dp_reshardable" in refused(path, layout(tp=1, dp=4))


def test_the_replicated_optimizer_reshards(tmp_path):
    assert check_layout(saved(tmp_path, layout(dist_opt=False)), layout(tp=1, dp=1, dist_opt=False)) is False


def test_another_model_is_one_line_naming_the_fields(tmp_path):
    path = saved(tmp_path, layout())
    msg = refused(path, layout(**{"model.head_rank": 4}))
    assert "another model (model.head_rank: saved 8, now 4)" in msg and "model.head_rank=8" in msg
    msg = refused(path, layout(tp=1, **{"model.fused_loss": True, "train.precision": "bf16"}))
    assert "model.fused_loss: saved False, now True, train.precision: saved fp32, now bf16" in msg


def test_another_optimizer_kind_is_refused(tmp_path):
    msg = refused(saved(tmp_path, layout()), layout(dist_opt=False))
    assert "parallel.distributed_optimizer=true" in msg


@pytest.mark.parametrize("old,now", [(layout(pp=2, vpp=2, dp=1), layout(pp=2, vpp=None, dp=1)),
                                     (layout(pp=2, vpp=2, dp=1), layout(pp=1, vpp=2, dp=2))])
def test_virtual_pipeline_changes_are_refused(tmp_path, old, now):
    assert "virtual pipeline" in refused(saved(tmp_path, old), now)


def test_no_layout_file_needs_the_same_number_of_ranks(tmp_path):
    path = saved(tmp_path, None)
    for r in range(4):
        open(os.path.join(path, f"rank_{r}.pt"), "w").close()
    assert check_layout(path, layout()) is True
    assert "the state of 4 ranks, and this run has 2" in refused(path, layout(dp=1))


def test_fully_reshardable_is_guarded_by_megatron_core_version():
    low, high = FULLY_RESHARDABLE_SHIMMED
    check_optimizer_format("fully_reshardable")  # the installed megatron-core: verified
    for ok in (f"{low[0]}.{low[1]}.1", f"{high[0]}.{high[1]}.2", "0.17.0rc0"):
        check_optimizer_format("fully_reshardable", ok)
    for fmt in ("dp_reshardable", None):
        check_optimizer_format(fmt, "0.99.0")  # no workaround needed, any version
    for bad in (f"{high[0]}.{high[1] + 1}.0", "0.15.3", "1.0.0"):
        with pytest.raises(CheckpointError) as e:
            check_optimizer_format("fully_reshardable", bad)
        msg = str(e.value)
        assert "\n" not in msg and f"this is megatron-core {bad}" in msg
        assert "use checkpoint.optimizer_format=dp_reshardable" in msg


def test_dp_reshardable_state_needs_the_saved_ddp_buckets(tmp_path):
    """The dp_reshardable state is laid out by DDP bucket: other buckets at the same TP/PP (another
    parallel.ddp_bucket_size, overlap off, or the default bucket size at DP > 40) are one line naming the setting
    to resume with; the fully_reshardable state does not depend on them."""
    def with_buckets(size, buckets, **kw):
        return {**layout(**kw), "ddp_bucket_size": size, "ddp_buckets": buckets}

    path = saved(tmp_path, with_buckets(40_000_000, [[40_000_512, 3_000_000]], fmt="dp_reshardable"))
    assert check_layout(path, with_buckets(40_000_000, [[40_000_512, 3_000_000]], fmt="dp_reshardable")) is True
    assert check_layout(path, with_buckets(40_000_000, [[40_000_512, 3_000_000]], dp=1)) is False
    msg = refused(path, with_buckets(41_000_000, [[41_000_192, 2_000_320]], dp=41))
    assert "dp_reshardable format, laid out by DDP bucket" in msg and "saved 40000000, now 41000000" in msg
    assert "Resume with parallel.ddp_bucket_size=40000000" in msg
    one = saved(tmp_path / "one", with_buckets(None, [[43_000_512]], fmt="dp_reshardable"))
    assert "parallel.overlap_grad_reduce=false and parallel.ddp_bucket_size=null" in refused(
        one, with_buckets(40_000_000, [[40_000_512, 3_000_000]]))
    # at another TP size the buckets differ anyway: the TP/PP message
    assert "model-parallel layout changed" in refused(path, with_buckets(40_000_000, [[20_000_512]], tp=1, dp=4))
    full = saved(tmp_path / "full", with_buckets(40_000_000, [[40_000_512, 3_000_000]]))
    assert check_layout(full, with_buckets(41_000_000, [[41_000_192, 2_000_320]], dp=41)) is False


def test_a_checkpoint_without_optimizer_state_reshards_tp_pp_and_any_optimizer(tmp_path):
    """``convert-head``'s checkpoints (layout.json ``optimizer_saved: false``): nothing of the optimizer to reshard,
    so another TP/PP, format, optimizer kind or buckets resume (the model reshards); another model and other
    virtual pipeline stages are still refused."""
    path = saved(tmp_path, {**layout(fmt="dp_reshardable"), "optimizer_saved": False, "ddp_buckets": [[100]]})
    assert check_layout(path, layout(fmt="dp_reshardable")) is True
    for now in (layout(tp=1, dp=4, fmt="dp_reshardable"), layout(pp=2, dp=1), layout(tp=1, dist_opt=False),
                {**layout(fmt="dp_reshardable"), "ddp_buckets": [[50, 50]]}):
        check_layout(path, now)
    assert "saved with another model" in refused(path, layout(fmt="dp_reshardable", **{"model.head_rank": 4}))
    assert "virtual pipeline" in refused(path, layout(vpp=2, fmt="dp_reshardable"))
