"""Multi-token prediction (one process, TP = PP = 1): the heads shared by the MTP depths as Megatron shares its
output layer, on GPTModel (``mtp_num_layers``; both lanes) and HybridModel (an MTP pattern ``"*-*-/*-"``;
megatron-core >= 0.19).

* the low-rank head at r = D with ``init=from_dense`` equals Megatron's dense head: the main loss, each depth's
  MTP loss (Megatron's own MTP loss tracker) and every gradient (the head's by the chain rule W = A B);
* every built-in head: the fused loss equals the unfused one (losses, MTP losses, every gradient), so each
  depth's fused loss uses the depth's own labels; with ``mtp_detach_heads`` (megatron-core >= 0.19) the MTP loss
  trains none of the head's parameters (their gradients equal those of the model whose MTP loss weighs 0) while
  without it it does;
* the probe: on the main head by default (its figures equal those of the same model without MTP), on depth k by
  ``ProbeConfig.mtp_depth``, the same fused and unfused; refusals in one line;
* a HybridModel pattern with two MTP depths builds the local MTP block and logs two MTP losses.
"""
import pytest
import torch

import megatron_bottleneck as mb
from tests import support, support_hybrid as sh
from tests.support import error_of

D = support.HIDDEN
HAS_DETACH = sh.HAS_HYBRID  # mtp_detach_heads: megatron-core >= 0.19
MTP_PATTERN = "*-*-/*-"


def build(arch="gpt", head=None, fused=False, mtp=1, **kw):
    torch.manual_seed(0)
    if arch == "gpt":
        return mb.build_gpt_model(sh.config(2, mtp_num_layers=mtp, **kw), support.VOCAB, support.SEQ,
                                  head=head, fused_loss=fused)
    pattern = MTP_PATTERN if mtp else "*-*-"
    return mb.build_hybrid_model(sh.config(4, mtp_num_layers=mtp, **kw), support.VOCAB, support.SEQ,
                                 hybrid_layer_pattern=pattern, head=head, fused_loss=fused)


def mtp_tracker():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return MTPLossLoggingHelper.tracker


def run(model, batch):
    """Main loss, each MTP depth's loss (Megatron's tracker: sum of loss_mask x loss / tokens) and every
    parameter's gradient of one forward-backward in training mode."""
    tracker = mtp_tracker()
    tracker.clear()
    model.zero_grad(set_to_none=True)
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    loss = model(batch["tokens"], pos, None, labels=batch["labels"]).float().mean()
    loss.backward()
    mtp = tracker.get("loss_values", tracker.get("values"))  # 0.19 / 0.16 key; none without MTP
    return {"loss": loss.item(), "mtp": None if mtp is None else mtp.detach().clone(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def same(got, want, names=None):
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0)
    torch.testing.assert_close(got["mtp"], want["mtp"], rtol=1e-6, atol=0)
    for name in (names if names is not None else want["grads"]):
        close(got["grads"][name], want["grads"][name], name)


def close(got, want, name):
    """Elementwise to 1e-5 relative, and 1e-5 of the tensor's largest entry absolute (float32 sums in another
    order: the fused op's vocab chunks)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=max(1e-7, 1e-5 * want.abs().max().item()), msg=name)


ARCHS = ["gpt", pytest.param("hybrid", marks=sh.NEEDS_HYBRID)]


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("arch", ARCHS)
def test_low_rank_at_full_rank_from_dense_equals_the_dense_head_with_mtp(arch):
    batch = support.batches(3)[0]
    dense = build(arch)
    assert type(dense.mtp).__name__ == "MultiTokenPredictionBlock" and len(dense.mtp.layers) == 1
    low = build(arch)
    low.load_state_dict(dense.state_dict())
    mb.install_head(low, "low_rank:r=32,init=from_dense")
    want, got = run(dense, batch), run(low, batch)
    assert 4.0 < want["loss"] < 7.0 and want["mtp"].shape == (1,) and 4.0 < want["mtp"][0] < 7.0
    assert sorted(got["grads"]) == sorted([*want["grads"], "output_layer.input_proj"])
    same(got, want, [n for n in want["grads"] if not n.startswith("output_layer.")])
    assert all(want["grads"][n].abs().sum() > 0 for n in want["grads"] if n.startswith("mtp."))
    gw = want["grads"]["output_layer.weight"]  # W = A B: dL/dA = dL/dW B^T, dL/dB = A^T dL/dW
    a, b = low.output_layer.weight.detach(), low.output_layer.input_proj.detach()
    torch.testing.assert_close(got["grads"]["output_layer.weight"], gw @ b.t(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["grads"]["output_layer.input_proj"], a.t() @ gw, rtol=1e-5, atol=1e-7)
    record = probe_record(low, batch, 1) if arch == "hybrid" else None  # (GPTModel's probe: below)
    # fused: the main and every depth's loss through the fused op, with the depth's rolled labels
    mb.enable_fused_loss(low)
    same(run(low, batch), got)
    if record is not None:
        fused = probe_record(low, batch, 1)
        assert record["grad_norm"] > 0 and set(record) <= set(fused)
        for key, value in record.items():
            assert fused[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", sh.KINDS)
def test_every_head_is_shared_by_the_mtp_depths_fused_and_detached(kind):
    batch = support.batches(4)[2]
    head = mb.HeadConfig.parse(kind, seed=7)
    model = build(head=head)
    unfused = run(model, batch)
    head_names = [n for n in unfused["grads"] if n.startswith("output_layer.")]
    assert head_names and any(n.startswith("mtp.") for n in unfused["grads"])
    mb.enable_fused_loss(model)
    same(run(model, batch), unfused)
    if not HAS_DETACH:
        return
    state = model.state_dict()
    no_mtp_loss = build(head=head, mtp_loss_scaling_factor=0.0)
    no_mtp_loss.load_state_dict(state)
    want = run(no_mtp_loss, batch)
    for fused in (False, True):
        detached = build(head=head, fused=fused, mtp_detach_heads=True)
        detached.load_state_dict(state)
        got = run(detached, batch)
        assert got["loss"] == pytest.approx(unfused["loss"], rel=1e-6, abs=0)
        torch.testing.assert_close(got["mtp"], unfused["mtp"], rtol=1e-6, atol=0)
        for name in head_names:  # the MTP loss reaches no head parameter ...
            close(got["grads"][name], want["grads"][name], name)
        assert any(got["grads"][n].abs().sum() > 0 for n in got["grads"] if n.startswith("mtp."))
    # ... while without mtp_detach_heads it does
    assert any(not torch.allclose(unfused["grads"][n], want["grads"][n], rtol=1e-4, atol=1e-6) for n in head_names)


def probe_record(model, batch, depth):
    p = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, vocab_size=support.VOCAB,
                                        general_tokens=16, general_iterations=16, mtp_depth=depth))
    p.watch(model, num_microbatches=1)
    run(model, batch)
    record = p.end_step()
    p.remove()
    return record


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", ["low_rank:r=8", "sigsoftmax"])
def test_the_probe_measures_the_main_head_or_one_depth(kind):
    """Linear (low-rank) and general (sigsoftmax) probe path."""
    batch = support.batches(3)[1]
    head = mb.HeadConfig.parse(kind, seed=7)
    model = build(head=head)
    main, depth = probe_record(model, batch, 0), probe_record(model, batch, 1)
    plain = build(head=head, mtp=None)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    want = probe_record(plain, batch, 0)
    assert want and set(main) == set(want) == set(depth)
    for key, value in want.items():  # the main head: as if there were no MTP
        assert main[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # depth 1: another gradient (Megatron's MTP loss weight 0.1 on it)
    assert depth["grad_norm"] == pytest.approx(0.1 * main["grad_norm"], rel=0.5)
    assert depth["destroyed_ratio"] != pytest.approx(main["destroyed_ratio"], rel=1e-6, abs=0)
    mb.enable_fused_loss(model)
    for record, fused in ((main, probe_record(model, batch, 0)), (depth, probe_record(model, batch, 1))):
        assert set(record) <= set(fused)  # (+ update_tokens: the fused path's update figures' token slice)
        for key, value in record.items():
            assert fused[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert error_of(lambda: probe_record(model, batch, 2)) == (
        "ConfigError: probe.mtp_depth=2, but the model has 1 multi-token prediction depths on this stage: set "
        "probe.mtp_depth between 0 and 1.")
    assert "probe.mtp_depth must be >= 0" in error_of(lambda: mb.ProbeConfig(mtp_depth=-1))


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
def test_hybrid_pattern_with_two_mtp_depths():
    """(The pattern's refusals: tests/unit/test_hybrid_model.py.)"""
    two = mb.build_hybrid_model(sh.config(4, mtp_num_layers=2), support.VOCAB, support.SEQ,
                                hybrid_layer_pattern="*-*-/-/-", head="low_rank:r=8")
    assert len(two.mtp.layers) == 2 and type(two.mtp.layers[0].enorm).__name__ == "SequenceParallelNorm"
    got = run(two, support.batches(3)[0])
    assert got["mtp"].shape == (2,) and bool((got["mtp"] > 4.0).all())
