"""The probe on the hot path of a GPU job: no host syncs but one per recorded step (after the schedule), a fault
on one tensor-parallel rank switches the probe off on all of them without a stall, and a fused model's update
and rank figures come from a token slice (no ``[s, b, V/tp]`` tensor) and equal the unfused probe's."""
import functools

import pytest

import megatron_bottleneck as mb
from tests import support
from tests.distributed import probe_safety_ranks as ranks


def test_no_host_sync_in_the_schedule_and_one_per_recorded_step():
    for r in mb.launch(functools.partial(ranks.sync_counts, 2), 2, timeout=300):
        assert r["recorded"] == [0, 2]
        schedule, end = zip(*r["counts"])
        assert schedule == (0, 0, 0, 0), r["where"]  # head, fused loss, probe hooks, the schedule driver
        assert end == (1, 0, 1, 0)  # one transfer on each recorded step, none on the others


@pytest.fixture(scope="module")
def fault_runs():
    off = mb.launch(functools.partial(ranks.failing_rank, 2, True, 1, False), 2, timeout=300)
    on = mb.launch(functools.partial(ranks.failing_rank, 2, True, 1, True), 2, timeout=300)
    return off, on


def test_a_fault_on_one_rank_switches_the_probe_off_on_every_rank(fault_runs):
    off, on = fault_runs
    for r_on, r_off in zip(on, off):
        assert r_on["enabled"] == [True, False, False]  # both ranks, after the faulty step
        assert r_on["steps"] == [0]  # step 0 recorded; nothing after the fault
        assert "ProbeFault: injected" in r_on["error"] or "another tensor-parallel rank" in r_on["error"]
        assert r_on["losses"] == r_off["losses"]  # training went on, unchanged (bitwise)
    assert "ProbeFault" in on[1]["error"] and "another tensor-parallel rank" in on[0]["error"]
    # the collective-sequence check: both ranks entered the same collectives (op, shapes, dtypes) in order
    assert on[0]["collectives"] == on[1]["collectives"] and len(on[0]["collectives"]) > len(off[0]["collectives"])


def test_fused_update_and_rank_figures_equal_the_unfused_probe():
    """With a slice covering every token, the fused model's update and rank figures (G recomputed from the fused
    pass) equal the unfused probe's (G from autograd), at TP=2."""
    fused = mb.launch(functools.partial(ranks.fused_update_rank, 2, True, 64.0), 2, timeout=300)
    unfused = mb.launch(functools.partial(ranks.fused_update_rank, 2, False, 64.0), 2, timeout=300)
    (f,), (u,) = fused[0]["history"], unfused[0]["history"]
    assert f["update_tokens"] == support.SEQ * ranks.MICRO * support.NUM_MICRO
    for key in ("update_cosine", "destroyed_ratio", "grad_norm", "effective_rank", "energy_top10"):
        assert f[key] == pytest.approx(u[key], rel=1e-5), key
    assert f["numerical_rank"] == u["numerical_rank"] and f["rank_tokens"] == u["rank_tokens"]


def test_a_fused_update_rank_step_allocates_no_logit_sized_tensor():
    """A slice of 4 KiB per micro-batch (4 tokens of V=256): no [s, b, V] tensor anywhere in the step, while the
    unfused model allocates several."""
    (fused,) = mb.launch(functools.partial(ranks.fused_update_rank, 1, True, 4 / 1024, True, 16), 1, timeout=300)
    (unfused,) = mb.launch(functools.partial(ranks.fused_update_rank, 1, False, 4 / 1024, True, 16), 1, timeout=300)
    assert unfused["logit_sized"], "the detector must see the unfused path's logits"
    assert fused["logit_sized"] == []
    (h,) = fused["history"]
    assert h["update_tokens"] == 4 * support.NUM_MICRO and h["rank_tokens"] == 4 * support.NUM_MICRO
    assert 0 < h["update_cosine"] < 1 and 0 < h["destroyed_ratio"] < 1


@pytest.fixture(scope="module")
def general_faults():
    return mb.launch(ranks.general_failing_rank, 2, timeout=600)


def test_the_general_probe_fails_together_at_every_stage(general_faults):
    """A non-linear head at TP=2 and TP=2 + SP, fused (mos) and unfused (sigsoftmax): a fault on rank 1 at step 1
    in the forward sample, the backward hook, mid-way through CG or in the figures after the reduction. The step
    completes on both ranks, both switch the probe off with last_error, and the losses are bitwise the probe-off
    run's."""
    cases = {k.rsplit(" ", 1)[0] for k in general_faults[0]}
    assert len(cases) == 4
    for case in cases:
        for r in general_faults:
            off, clean = r[f"{case} off"], r[f"{case} None"]
            assert len(off["losses"]) == 6 and clean["losses"] == off["losses"], case
            assert clean["enabled"] == [True, True, True] and clean["steps"] == [0, 1, 2] and clean["error"] is None
            for stage in ranks.FAULT_STAGES:
                got = r[f"{case} {stage}"]
                assert got["losses"] == off["losses"], (case, stage)
                assert got["enabled"] == [True, False, False], (case, stage)
                assert got["steps"] == [0], (case, stage)
        for stage in ranks.FAULT_STAGES:
            assert "ProbeFault: injected" in general_faults[1][f"{case} {stage}"]["error"], (case, stage)
            assert "another tensor-parallel rank" in general_faults[0][f"{case} {stage}"]["error"], (case, stage)
        # a fault after the step's one host sync: that rank drops its record, and the next step's reduction
        # switches every rank off
        zero, one = (r[f"{case} host"] for r in general_faults)
        assert zero["losses"] == one["losses"] == general_faults[0][f"{case} off"]["losses"]
        assert zero["enabled"] == one["enabled"] == [True, True, False], case
        assert zero["steps"] == [0, 1] and one["steps"] == [0], case
        assert "ProbeFault: injected" in one["error"] and "another tensor-parallel rank" in zero["error"]
        # step boundaries from begin_step: a count that disagrees with the schedule (1 for 2 micro-batches, on
        # every rank) closes the step at its second forward, flagged: both switch off together, losses unchanged
        for r in general_faults:
            got = r[f"{case} boundary"]
            assert got["losses"] == r[f"{case} off"]["losses"] and got["enabled"] == [True, False, False], case
            assert got["steps"] == [0] and "step boundaries: a head forward beyond" in got["error"], case


def test_every_rank_enters_the_same_collectives(general_faults):
    """The collective-sequence check: for every case and stage, both ranks entered the same collectives (op,
    shapes, dtypes) in the same order, with and without a fault; the probe adds collectives (the record is not
    empty of them) and a faulty step's sequence is the clean step's."""
    zero, one = general_faults
    for key in zero:
        assert zero[key]["collectives"] == one[key]["collectives"], key
    for case in {k.rsplit(" ", 1)[0] for k in zero}:
        off, clean = zero[f"{case} off"]["collectives"], zero[f"{case} None"]["collectives"]
        assert len(clean) > len(off) > 0
        for stage in ranks.FAULT_STAGES:
            faulty = zero[f"{case} {stage}"]["collectives"]
            assert faulty[:len(off)] == clean[:len(off)]  # the first (healthy) step starts the same
