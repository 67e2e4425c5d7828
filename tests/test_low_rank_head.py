"""The low-rank head under real TP / SP / PP / interleaved PP and distributed checkpointing (gloo, CPU).

Three launches (1, 2 and 4 ranks) run every layout from one shared TP=1 checkpoint; the tests then
compare losses and full (re-assembled) gradients against the single-process reference.
"""
import pytest
import torch

import megatron_bottleneck as mb
import parallel_runs as pr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ckpt"))
    one = mb.launch(pr.world1, 1, tmp, timeout=300)[0]
    two = mb.launch(pr.world2, 2, tmp, timeout=300)
    four = mb.launch(pr.world4, 4, tmp, timeout=400)
    return {"one": one, "two": two, "four": four}


def _layout(results, name):
    return [r[name] for r in results]


def test_factorised_full_rank_equals_megatron_dense_head(runs):
    for dense in (runs["one"]["dense"], runs["two"][0]["dense"], runs["two"][1]["dense"]):
        assert dense["factorised_loss"] == pytest.approx(dense["dense_loss"], rel=1e-6)
        assert dense["dh_norm"] > 0
        assert dense["dh_max_diff"] <= 1e-6 * dense["dh_norm"]


def test_low_rank_grads_match_float64_reference(runs):
    d = runs["one"]["dense"]
    assert d["lowrank_loss"] == pytest.approx(d["ref_loss"], rel=1e-6)
    torch.testing.assert_close(d["a_grad"], d["a_ref"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(d["b_grad"], d["b_ref"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "world,name",
    [("two", "tp2"), ("two", "tp2_sp"), ("two", "pp2"), ("two", "pp2_vpp2"),
     ("four", "tp2_pp2"), ("four", "tp2_pp2_sp")],
)
def test_layout_matches_single_process(runs, world, name):
    ref = runs["one"]["ref"]
    results = _layout(runs[world], name)
    torch.testing.assert_close(
        torch.tensor(pr.last_stage_losses(results)), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
    )
    got, want = pr.assemble(results), pr.assemble([ref])
    assert set(got) == set(want)
    assert {"output_layer.weight", "output_layer.input_proj"} <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_sequence_parallel_marks_head_projection(runs):
    # Under SP the head's B gradient is partial per rank before finalize_model_grads; after it, equal.
    results = _layout(runs["two"], "tp2_sp")
    b0, b1 = (r["grads"]["output_layer.input_proj"]["grad"] for r in results)
    torch.testing.assert_close(b0, b1)
    assert b0.abs().sum() > 0


def test_checkpoint_resharding_between_tp_sizes(runs):
    two = runs["two"][0]
    four = runs["four"][0]
    # saved at TP=1 (reference), loaded at TP=2 and back at TP=1: same loss.
    assert two["tp2_loaded_ref_loss"] == pytest.approx(four["tp1_loaded_ref_loss"], rel=1e-6)
    # saved at TP=2, loaded at TP=1: same loss.
    assert four["tp1_loaded_tp2_loss"] == pytest.approx(two["tp2_saved_loss"], rel=1e-6)
    assert two["tp2_saved_loss"] != pytest.approx(two["tp2_loaded_ref_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "key,pattern",
    [
        ("rank0", r"rank must be an integer >= 1"),
        ("rank_too_big", r"exceeds the hidden size 32"),
        ("tied", r"ties its input embedding.*untie-embeddings-and-output-weights"),
        ("mtp", r"multi-token prediction .* mtp_num_layers=None"),
        ("bad_init", r"init='svd' is not one of"),
        ("twice", r"already has a LowRankOutputLayer"),
        ("wrapped", r"before DDP wrapping"),
        ("fp8_without_te", r"fp8='hybrid' needs NVIDIA Transformer Engine.*megatron-bottleneck\[te\]"),
    ],
)
def test_validation_errors(runs, key, pattern):
    import re

    assert re.search(pattern, runs["one"]["errors"][key]), runs["one"]["errors"][key]


def test_full_rank_is_allowed_and_vocab_must_divide_tp(runs):
    assert runs["one"]["errors"]["full_rank_ok"] == "LowRankOutputLayer"
    assert runs["one"]["errors"]["hook"] == "LowRankOutputLayer:4,LowRankOutputLayer:4"  # pre-wrap hook
    assert "not divisible by the tensor-parallel size 2" in runs["two"][0]["vocab_error"]
