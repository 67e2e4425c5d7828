"""HybridModel (local hybrid stack spec, ``*-*-``) on real CPU ranks, with every built-in head, in two spawns:

* 2 ranks at TP = 2: each head's model is saved (dist_checkpointing) and its loss taken at TP = 2, at TP = 2 + SP
  (the same checkpoint loaded) and with the fused loss at TP = 2 + SP; GradientProbe's record at TP = 2 + SP for
  a linear (low-rank) and a general (sigsoftmax) head; then, on the same ranks at PP = 2 (``*-|*-``), the
  low-rank model loaded from the TP = 2 checkpoint trains a few steps through Megatron's pipeline schedule, the
  probe watching its last stage; and at PP = 2 x VPP = 2 (the default pattern ``*-|*-|*-|*-``) the chunks run
  one step of Megatron's interleaved schedule (micro-batch groups of 4 > PP), the probe's step being that step.
* 1 rank at TP = 1: every TP = 2 checkpoint loads; its loss equals the TP = 2 ones, the probe's record equals
  the TP = 2 + SP one, and the PP = 2 run's first loss and probe record equal the TP = 1 ones of the same
  batches.
"""
import functools

import pytest
import torch

import megatron_bottleneck as mb
from tests import support, support_hybrid as sh

pytestmark = sh.NEEDS_HYBRID
PROBED = ("low_rank:r=8", "sigsoftmax")
STEPS = 6


def _loss(model, batch) -> float:
    with torch.no_grad():
        pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
        return model(batch["tokens"], pos, None, labels=batch["labels"]).float().mean().item()


def _ckpt(root, kind):
    return f"{root}/{kind.replace(':', '_').replace(',', '_').replace('=', '')}"


def _probe_record(model, batch):
    return sh.loss_and_grads(model, batch, probe=True)["record"]


def tp2_then_pp2(root):
    from megatron.core import parallel_state as ps

    batch = support.batches(5)[0]
    out = {"loss": {}, "loss_sp": {}, "loss_fused_sp": {}, "record": {}}
    mb.initialize_parallel(2, 1, seed=21)
    for kind in sh.KINDS:
        model = sh.hybrid(kind, tp=2)
        support.save([model], _ckpt(root, kind))
        out["loss"][kind] = _loss(model, batch)
        sp = sh.hybrid(kind, tp=2, sp=True)
        support.load([sp], _ckpt(root, kind))
        out["loss_sp"][kind] = _loss(sp, batch)
        out.setdefault("tags", {})[kind] = {
            n: (getattr(p, "is_embedding_or_output_parameter", False), getattr(p, "sequence_parallel", False),
                getattr(p, "tensor_model_parallel", False)) for n, p in sp.output_layer.named_parameters()}
        if kind in PROBED:
            out["record"][kind] = _probe_record(sp, batch)
        mb.enable_fused_loss(sp)
        out["loss_fused_sp"][kind] = _loss(sp, batch)
    mb.destroy_parallel()

    mb.initialize_parallel(1, 2, seed=21)
    cfg = sh.config(4, pp=2)
    model = mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, hybrid_layer_pattern="*-|*-",
                                  head=mb.HeadConfig.parse("low_rank:r=8", seed=7))
    out["pp_stage"] = (ps.get_pipeline_model_parallel_rank(), [layer.layer_number for layer in model.decoder.layers],
                       hasattr(model, "output_layer"))
    support.load([model], _ckpt(root, "low_rank:r=8"))
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, vocab_size=support.VOCAB))
    probe.watch([model], num_microbatches=support.NUM_MICRO)
    models = support.wrap_ddp(cfg, [model])
    losses = []
    for step in range(STEPS):
        result = mb.forward_backward(models, support.batches(0))
        record = probe.end_step()
        if step == 0:
            out["pp_record"] = record
        with torch.no_grad():
            for p in models[0].parameters():
                p.add_(p.main_grad, alpha=-0.5)
        if result.losses is not None:
            losses.append(sum(result.losses) / len(result.losses))
    out["pp_losses"] = losses or None
    mb.destroy_parallel()

    mb.initialize_parallel(1, 2, 2, seed=21)  # PP = 2 x VPP = 2: the default pattern '*-|*-|*-|*-'
    # micro-batch groups of 4 per virtual stage (> PP): the first chunk runs all four forwards before any backward
    cfg = sh.config(8, pp=2, virtual_pipeline_model_parallel_size=2, microbatch_group_size_per_vp_stage=4)
    chunks = [mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, vp_stage=i, head="mos:k=2") for i in range(2)]
    out["vpp_layers"] = [[layer.layer_number for layer in c.decoder.layers] for c in chunks]
    out["vpp_head"] = [type(getattr(c, "output_layer", None)).__name__ for c in chunks]
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, vocab_size=support.VOCAB, general_iterations=8))
    probe.watch(chunks)
    out["vpp_losses"] = mb.forward_backward(support.wrap_ddp(cfg, chunks), support.batches(0), probe=probe).losses
    out["vpp_probe"] = (list(probe.history), probe.last_error)
    probe.remove()
    mb.destroy_parallel()
    return out


def tp1(root):
    batch = support.batches(5)[0]
    out = {"loss": {}, "record": {}}
    mb.initialize_parallel(1, 1, seed=3)
    for kind in sh.KINDS:
        model = sh.hybrid(kind)
        fresh = _loss(model, batch)
        support.load([model], _ckpt(root, kind))
        out["loss"][kind] = _loss(model, batch)
        out.setdefault("fresh", {})[kind] = fresh
        if kind in PROBED:
            out["record"][kind] = _probe_record(model, batch)
    model = sh.hybrid("low_rank:r=8")
    support.load([model], _ckpt(root, "low_rank:r=8"))
    out["pp_first"] = sum(_loss(model, b) for b in support.batches(0)) / support.NUM_MICRO
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, vocab_size=support.VOCAB))
    probe.watch(model, num_microbatches=support.NUM_MICRO)
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    for b in support.batches(0):
        (model(b["tokens"], pos, None, labels=b["labels"]).float().mean() / support.NUM_MICRO).backward()
    out["pp_record"] = probe.end_step()
    mb.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hybrid"))
    two = mb.launch(functools.partial(tp2_then_pp2, root), 2, timeout=900)
    one = mb.launch(functools.partial(tp1, root), 1, timeout=600)[0]
    return two, one


def test_tp2_and_sp_equal_tp1_from_the_tp2_checkpoint(runs):
    two, one = runs
    for kind in sh.KINDS:
        want = one["loss"][kind]
        assert 4.0 < want < 7.0, kind
        assert want != one["fresh"][kind], kind  # the checkpoint's weights, not TP = 1's own draws
        for r in two:
            for key in ("loss", "loss_sp", "loss_fused_sp"):
                assert r[key][kind] == pytest.approx(want, rel=1e-5), (kind, key)


def test_head_parameters_carry_megatron_tags_under_tp2_sp(runs):
    """Decoupled LR / Muon tag on every head parameter; the replicated ones (not vocab-sharded) used on the sequence
    shard tagged sequence_parallel (finalize_model_grads all-reduces them over TP)."""
    tags = runs[0][0]["tags"]
    for kind in sh.KINDS:
        assert all(t[0] for t in tags[kind].values()), (kind, tags[kind])
        assert not any(t[1] and t[2] for t in tags[kind].values()), (kind, tags[kind])  # sharded: never SP-summed
    assert tags["low_rank:r=8"]["input_proj"] == (True, True, False)
    assert tags["stacked:width=40,activation=tanh"]["proj"][1] and tags["mos:k=2"]["prior"][1]


def test_the_probe_on_hybrid_at_tp2_sp_equals_tp1(runs):
    two, one = runs
    for kind in PROBED:
        want = one["record"][kind]
        assert 0.0 < want["destroyed_ratio"] < 1.0
        got = [r["record"][kind] for r in two if r["record"].get(kind)]
        assert got, kind
        for key in ("destroyed_ratio", "visible_cosine", "grad_norm", "hidden_grad_norm"):
            if key in want:
                assert got[0][key] == pytest.approx(want[key], rel=1e-4), (kind, key)


def test_pp2_trains_from_the_tp2_checkpoint(runs):
    two, one = runs
    stages = sorted(r["pp_stage"] for r in two)
    assert stages == [(0, [1, 2], False), (1, [3, 4], True)]
    losses = next(r["pp_losses"] for r in two if r["pp_losses"])
    assert [r["pp_losses"] for r in two].count(None) == 1  # the loss lives on the last stage only
    assert len(losses) == STEPS
    assert losses[0] == pytest.approx(one["pp_first"], rel=1e-5)
    assert losses[-1] < losses[0] - 0.1, losses
    # interleaved: PP = 2 x VPP = 2 chunks take the default pattern's segments in Megatron's order and run
    assert sorted(r["vpp_layers"] for r in two) == [[[1, 2], [5, 6]], [[3, 4], [7, 8]]]
    assert sorted(r["vpp_head"] for r in two) == [["NoneType", "MixtureOfSoftmaxesHead"], ["NoneType", "NoneType"]]
    vpp = [r["vpp_losses"] for r in two if r["vpp_losses"]]
    assert len(vpp) == 1 and len(vpp[0]) == support.NUM_MICRO and all(4.0 < x < 7.0 for x in vpp[0])
    # the probe's step is the interleaved schedule's step (begun and ended by the driver): one record whose token
    # sample holds every micro-batch's tokens
    probed = [r["vpp_probe"] for r in two if r["vpp_probe"][0]]
    assert len(probed) == 1 and probed[0][1] is None, [r["vpp_probe"] for r in two]
    (record,) = probed[0][0]
    assert record["probe_tokens"] == support.NUM_MICRO * support.MICRO * support.SEQ
    assert 0.0 < record["destroyed_ratio"] < 1.0 and record["grad_norm"] > 0
    # the probe on the last stage of the pipeline: the TP = 1 record of the same step
    records = [r["pp_record"] for r in two if r["pp_record"]]
    assert len(records) == 1 and 0.0 < one["pp_record"]["destroyed_ratio"] < 1.0
    for key in ("destroyed_ratio", "visible_cosine", "hidden_grad_norm", "grad_norm"):
        assert records[0][key] == pytest.approx(one["pp_record"][key], rel=1e-4), key
