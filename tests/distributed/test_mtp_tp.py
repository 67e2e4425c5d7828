"""Multi-token prediction at TP = 2 (one spawn of 2 CPU ranks, GPTModel with ``mtp_num_layers=1``): for a linear
(low-rank) and a pointwise (sigsoftmax) head, without and with sequence parallelism, the fused loss equals the
unfused one (main loss, the MTP loss, every head gradient) and the probe's record of MTP depth 1
(``ProbeConfig.mtp_depth=1``) is the same fused and unfused (under SP but its update figures, which the fused path
takes from a token slice); with ``mtp_detach_heads`` (megatron-core >= 0.19) the head's gradients equal those of
the model whose MTP loss weighs 0."""
import pytest

import megatron_bottleneck as mb
from tests import support, support_hybrid as sh
from tests.unit import test_mtp as um

KINDS = ("low_rank:r=8", "sigsoftmax")  # the linear and the general probe path (mos, ...: tests/unit/test_mtp.py)


def _head(result):
    return {n: g for n, g in result["grads"].items() if n.startswith("output_layer.")}


def ranks():
    mb.initialize_parallel(2, 1, seed=5)
    batch = support.batches(6)[1]
    out = []
    for kind in KINDS:
        head = mb.HeadConfig.parse(kind, seed=7)
        for sp in (False, True):
            model = um.build(head=head, tp=2, sp=sp)
            unfused = um.run(model, batch)
            record = um.probe_record(model, batch, 1)
            mb.enable_fused_loss(model)
            fused = um.run(model, batch)
            case = {"kind": kind, "sp": sp, "unfused": unfused, "fused": fused, "record": record,
                    "fused_record": um.probe_record(model, batch, 1)}
            if um.HAS_DETACH and not sp:
                state = model.state_dict()
                detached = um.build(head=head, tp=2, sp=sp, mtp_detach_heads=True)
                detached.load_state_dict(state)
                zero = um.build(head=head, tp=2, sp=sp, mtp_loss_scaling_factor=0.0)
                zero.load_state_dict(state)
                case["detached"], case["zero"] = _head(um.run(detached, batch)), _head(um.run(zero, batch))
            case["unfused"]["grads"], case["fused"]["grads"] = _head(unfused), _head(fused)
            out.append(case)
    mb.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def cases():
    return mb.launch(ranks, 2, timeout=900)


def test_fused_equals_unfused_with_mtp_under_tp2_and_sp(cases):
    assert len(cases) == 2 and len(cases[0]) == 2 * len(KINDS)
    for rank in cases:
        for case in rank:
            what = f"{case['kind']} sp={case['sp']}"
            assert 4.0 < case["unfused"]["mtp"][0] < 7.0, what
            um.same(case["fused"], case["unfused"])
            assert set(case["record"]) <= set(case["fused_record"]) and case["record"]["grad_norm"] > 0, what
            for key, value in case["record"].items():
                if case["sp"] and key.startswith("update"):
                    continue  # fused under SP: update figures of a token slice (differ without MTP too)
                assert case["fused_record"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (what, key)
            if "detached" in case:
                for name, grad in case["zero"].items():
                    um.close(case["detached"][name], grad, f"{what} {name}")
    # the two TP ranks agree on the losses and the record (TP-replicated figures)
    for a, b in zip(*cases):
        assert a["unfused"]["loss"] == pytest.approx(b["unfused"]["loss"], rel=1e-6)
        assert a["record"]["grad_norm"] == pytest.approx(b["record"]["grad_norm"], rel=1e-6)
    with_sp = {c["kind"]: c["unfused"]["loss"] for c in cases[0] if c["sp"]}
    for c in cases[0]:
        if not c["sp"]:
            assert with_sp[c["kind"]] == pytest.approx(c["unfused"]["loss"], rel=1e-6), c["kind"]
