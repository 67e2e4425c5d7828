"""The low-rank head under real TP / SP / PP / interleaved PP and distributed checkpointing (gloo, CPU).

Every layout starts from the TP=1 reference checkpoint (``reference`` fixture) and is compared, losses and
full re-assembled gradients, with the single-process reference step.
"""
import pytest
import torch

import megatron_bottleneck as mb
from tests import support

LAYOUTS = {  # name: (world size, tp, pp, vpp, sp)
    "tp2": (2, 2, 1, None, False),
    "tp2_sp": (2, 2, 1, None, True),
    "pp2": (2, 1, 2, None, False),
    "pp2_vpp2": (2, 1, 2, 2, False),
    "tp2_pp2": (4, 2, 2, None, False),
    "tp2_pp2_sp": (4, 2, 2, None, True),
}


# ------------------------------------------------------------------------------------------ rank functions
def perturbed_tp2_saved(path: str) -> float:
    """A TP=2 model with its own weights: saved to ``path``; returns its loss."""
    _, chunks = support.build_chunks(2, 1, None, False, 16)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    support.save(chunks, path)
    return support.loss_of(chunks, support.batches(1))


def loaded_loss(tp: int, path: str) -> float:
    _, chunks = support.build_chunks(tp, 1, None, False, 16)
    support.load(chunks, path)
    return support.loss_of(chunks, support.batches(1))


def vocab_not_divisible():
    mb.initialize_parallel(2, 1, seed=1)
    try:
        mb.build_gpt_model(support.config(2), 255, support.SEQ, head_rank=8)
    except mb.HeadConfigError as e:
        return str(e)
    return "no error"


# ------------------------------------------------------------------------------------------------ tests
def test_factorised_full_rank_equals_megatron_dense_head_under_tp2():
    for d in mb.launch(support.dense_vs_factorised, 2, 2, timeout=300):
        assert d["factorised_loss"] == pytest.approx(d["dense_loss"], rel=1e-6)
        assert d["dh_norm"] > 0 and d["dh_max_diff"] <= 1e-6 * d["dh_norm"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference, name):
    world, tp, pp, vpp, sp = LAYOUTS[name]
    results = mb.launch(support.step_layout, world, tp, pp, vpp, sp, 16, reference["ckpt"], timeout=400)
    ref = reference["result"]
    torch.testing.assert_close(torch.tensor(support.last_stage_losses(results)), torch.tensor(ref["losses"]),
                               rtol=1e-5, atol=0)
    got, want = support.assemble(results), support.assemble([ref])
    assert set(got) == set(want) and {"output_layer.weight", "output_layer.input_proj"} <= set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    if sp:  # B's gradient is partial per rank before finalize_model_grads; after it, equal on every TP rank
        b = [r["grads"]["output_layer.input_proj"]["grad"] for r in results if "output_layer.input_proj" in r["grads"]]
        torch.testing.assert_close(b[0], b[1])
        assert b[0].abs().sum() > 0


def test_checkpoint_reshards_between_tp_sizes(reference, tmp_path):
    # saved at TP=1 (reference), loaded at TP=2 and at TP=1: same loss.
    tp2_from_ref = mb.launch(loaded_loss, 2, 2, reference["ckpt"], timeout=300)[0]
    tp1_from_ref = mb.launch(loaded_loss, 1, 1, reference["ckpt"], timeout=300)[0]
    assert tp2_from_ref == pytest.approx(tp1_from_ref, rel=1e-6)
    # saved at TP=2 with other weights, loaded at TP=1: the TP=2 model's loss.
    saved = mb.launch(perturbed_tp2_saved, 2, str(tmp_path / "tp2"), timeout=300)[0]
    assert saved != pytest.approx(tp1_from_ref, rel=1e-4)
    assert mb.launch(loaded_loss, 1, 1, str(tmp_path / "tp2"), timeout=300)[0] == pytest.approx(saved, rel=1e-6)


def test_vocabulary_must_divide_tp():
    for message in mb.launch(vocab_not_divisible, 2, timeout=300):
        assert "not divisible by the tensor-parallel size 2" in message
