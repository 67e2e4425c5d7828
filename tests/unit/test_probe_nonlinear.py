"""GradientProbe on non-linear heads at TP=1 (the general path, probe.general): its record equals
probe.general.head_figures and the full-Jacobian brute force (tests/support_heads.py) on the same tokens, for the
fused mixture-of-softmaxes loss and the unfused sigsoftmax head, a token sample spanning two micro-batches; the
probe adds no host synchronisation to forward-backward (one in end_step)."""
import pytest

from tests import support_heads as sh
from tests.distributed.probe_safety_ranks import SyncCounter


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind,fused", sh.PROBE_CASES)
def test_gradient_probe_on_a_nonlinear_head_equals_brute_force(kind, fused):
    # brute force for the cheap sigsoftmax head (the mixture's per-parameter Jacobians take ~20 s here; its
    # head_figures equal brute force in tests/unit/test_probe_general.py)
    out = sh.probe_in_training(kind, fused, sp=False, tokens=20, sync_counter=SyncCounter,
                               brute=kind == "sigsoftmax")
    rec, want, brute, w = out["record"], out["head_figures"], out["brute"], out["weight"]
    assert out["error"] is None
    assert rec["probe_tokens"] == 20  # 16 tokens of the first micro-batch, 4 of the second
    for key in ("destroyed_ratio", "visible_cosine", "update_cosine"):
        assert rec[key] == pytest.approx(want[key], rel=1e-7, abs=1e-12), key
    assert rec["grad_norm"] == pytest.approx(w * want["grad_norm"], rel=1e-7)  # G is dL/du: the loss weight in it
    assert rec["cg_residual"] < 1e-6
    if brute is not None:
        assert rec["destroyed_ratio"] == pytest.approx(brute["destroyed_ratio"], rel=1e-7)
        assert rec["update_cosine"] == pytest.approx(brute["update_cosine"], rel=1e-7)
    assert 0.0 < rec["destroyed_ratio"] < 1.0
    syncs = out["syncs"]
    assert syncs["with_probe"] == syncs["without_probe"], syncs  # no host sync in the probe's hooks
    assert syncs["end_step"] == 1, syncs


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind,fused", sh.PROBE_CASES)
def test_forwards_ahead_of_backwards_give_the_in_order_figures(kind, fused):
    """A schedule that runs both forwards before their backwards (combined 1F1B, interleaved pipelines): one step,
    its token sample spanning both micro-batches, the figures of the in-order run, with the step opened by
    begin_step(2) and by its first forward alike (before, the second forward restarted the step: the sample
    lost the first micro-batch). A count that disagrees with the schedule (begin_step(1) or (3) for 2
    micro-batches) switches the probe off with last_error, training unharmed."""
    keys = ("grad_norm", "destroyed_ratio", "visible_cosine", "cg_residual", "update_cosine", "probe_tokens")
    want = sh.probe_in_training(kind, fused, sp=False, reference=False)
    assert want["error"] is None and want["records"] == 1 and want["record"]["probe_tokens"] == 20
    cheap = kind == "sigsoftmax"  # the mixture's CG costs seconds a run here: its fused path gets one run of each
    for begin in ((None, 2) if cheap else (2,)):
        got = sh.probe_in_training(kind, fused, sp=False, forwards_ahead=True, begin=begin, reference=False)
        assert got["error"] is None and got["records"] == 1, begin
        for key in keys:
            assert got["record"][key] == pytest.approx(want["record"][key], rel=1e-12, abs=1e-15), (begin, key)
    for begin in ((1, 3) if cheap else (1,)):
        off = sh.probe_in_training(kind, fused, sp=False, forwards_ahead=True, begin=begin, reference=False)
        assert off["records"] == 0 and not off["enabled"], begin
        assert "step boundaries" in off["error"] and f"said {begin} per step" in off["error"], off["error"]


@pytest.mark.usefixtures("megatron_one_rank")
def test_fewer_iterations_bound_the_destroyed_ratio_from_above():
    """A short CG run (2 iterations < D) reports a destroyed ratio >= the converged one, and says so in
    cg_residual."""
    import torch

    import megatron_bottleneck as mb
    from megatron_bottleneck.heads.contract import FusedLossConfig, LossContext

    ratios = {}
    for its in (2, 2 * sh.D):
        head = sh.build("mos:k=2,fused=false", 1, False).double()
        probe = mb.GradientProbe(mb.ProbeConfig(interval=1, general_tokens=16, general_iterations=its))
        probe.watch_head(head)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(sh.S, sh.B, sh.D, generator=gen, dtype=torch.float64, requires_grad=True)
        head.loss_context = LossContext(torch.randint(0, sh.V_REAL, (sh.S, sh.B), generator=gen), FusedLossConfig())
        head(x)[0].mean().backward()
        head.loss_context = None
        rec = probe.end_step()
        assert "update_cosine" not in rec
        ratios[its] = (rec["destroyed_ratio"], rec["cg_residual"])
    assert ratios[2][0] >= ratios[2 * sh.D][0] - 1e-12
    assert ratios[2][1] > 1e-3 > ratios[2 * sh.D][1]
