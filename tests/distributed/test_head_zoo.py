"""Every built-in head on real TP ranks (gloo, CPU), in ONE spawn of 2 ranks (CI time): forward, loss and
gradients at TP=2 and TP=2 + SP equal the single-process float64 reference (fused == materialised where fused
exists), the general probe's log_prob_fn (value, VJP, JVP under torch.func) at TP=2, checkpoints saved at
TP=2 load at TP=1 (same full parameters) and the same seed draws the same full parameters at TP=2 and TP=1;
GradientProbe's general path at TP=2 and TP=2 + SP equals head_figures on the same tokens; then the trainer
trains a few steps with ``model.head_type: mos`` at TP=2 + SP with the probe on and logs its figures."""
import json
import math
import os

import pytest
import torch

import megatron_bottleneck as mb
from tests import support_heads, support_loss


def train_mos(log_dir, data):
    """A few trainer steps with model.head_type: mos at TP=2 + SP (fused loss)."""
    from megatron_bottleneck.train import Trainer
    from tests.distributed import trainer_ranks as tr

    cfg = tr.config(log_dir, data, steps=12, probe={"interval": 1, "update_interval": 3, "general_tokens": 32,
                                                    "general_iterations": 8},
                    model={"head_rank": None, "head_type": "mos", "head_options": {"k": 2}, "fused_loss": True},
                    parallel={"sequence_parallel": True}, checkpoint={"dir": None},
                    optim={"lr": 3e-2, "warmup_steps": 1})
    trainer = Trainer(cfg)
    head = mb.find_head(trainer.models)
    out = trainer.train()
    jsonl = os.path.join(log_dir, "probe.jsonl")
    logged = [json.loads(line) for line in open(jsonl)] if trainer.probe.is_reporter else None
    return {"logged": logged, "head": type(head).__name__, "losses": [h["loss"] for h in out["history"]],
            "probe": list(trainer.probe.history), "probe_error": trainer.probe.last_error,
            "reporter": trainer.probe.is_reporter}


def general_probe_figures():
    """probe.general.head_figures of every non-linear built-in head at this TP layout (float64 parameter shards,
    the same tokens on every rank) and the brute force from the full parameters."""
    import dataclasses

    from megatron.core import parallel_state as ps

    from megatron_bottleneck.probe.general import head_figures

    out = {}
    mb.initialize_parallel(2, 1, seed=5)
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(8, support_heads.D, generator=gen, dtype=torch.float64) * 1.5
    y = torch.randint(0, support_heads.V_REAL, (8,), generator=gen)
    for kind in support_heads.KINDS:
        head = support_heads.build(kind, tp, False)
        lp = head.log_prob_fn()
        lp = dataclasses.replace(lp, params={k: v.double() for k, v in lp.params.items()})
        got = {k: float(v) for k, v in head_figures(lp, h, y, update=True).items()}
        out[kind] = (got, support_heads.brute_probe_figures(kind, support_heads._full_params(head, group, tp), h, y))
    mb.destroy_parallel()
    return out


def probe_in_training():
    """GradientProbe on float64 heads (tests/support_heads.py PROBE_CASES) at TP=2 and TP=2 + SP."""
    mb.initialize_parallel(2, 1, seed=5)
    out = {f"{kind} sp={sp}": support_heads.probe_in_training(kind, fused, sp, tokens=20, brute=False)
           for kind, fused in support_heads.PROBE_CASES for sp in (False, True)}
    mb.destroy_parallel()
    return out


def loss_spec_checks():
    """tests/support_loss.py at TP=2: every LossSpec option through every head (the probe's G == autograd) and
    through the fused op (reductions, class weights, softcap, bias, padded vocabulary), in this one spawn."""
    mb.initialize_parallel(2, 1, seed=5)
    checks, refusals = support_loss.check_probe_grads()
    checks += support_loss.check_op_tp()
    mb.destroy_parallel()
    return {"checks": checks, "refusals": refusals}


def heads_then_trainer(ckpt_dir, log_dir, data):
    checks = support_heads.heads_on_layout(2, True, ckpt_dir)
    return {"checks": checks, "probe": general_probe_figures(), "probe_training": probe_in_training(),
            "loss_spec": loss_spec_checks(), "train": train_mos(log_dir, data)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spamlang):
    tmp = tmp_path_factory.mktemp("zoo")
    return mb.launch(heads_then_trainer, 2, str(tmp / "ckpt"), str(tmp / "log"), spamlang, timeout=500)


def test_heads_at_tp2_and_sp_and_checkpoint_to_tp1(ranks):
    labels = set()
    for r in ranks:
        for label, got, want in r["checks"]:
            labels.add(label)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-6, msg=label)
    for kind in support_heads.KINDS:
        for part in ("loss", "forward", "log_prob_fn VJP dh", "log_prob_fn JVP", "checkpoint", "init"):
            assert any(x.startswith(f"{kind} {part}") for x in labels), (kind, part)
    assert any("sp=True" in x for x in labels)


def test_the_general_probe_of_every_head_at_tp2_equals_brute_force(ranks):
    """head_figures' destroyed ratio and update cosine at TP=2 (vocabulary-sharded W; collectives inside the
    head's JVP / VJP) equal the full-Jacobian brute force, on both ranks."""
    for r in ranks:
        assert set(r["probe"]) == set(support_heads.KINDS)
        for kind, (got, want) in r["probe"].items():
            for key in ("destroyed_ratio", "update_cosine"):
                assert got[key] == pytest.approx(want[key], rel=1e-8), (kind, key, got, want)


def test_probe_grad_and_fused_op_equal_float64_for_every_loss_option_at_tp2(ranks):
    """Every built-in head x LossSpec option at TP=2: the probe's G (this rank's vocabulary columns) equals
    autograd's dL/dz of the float64 loss the head trains on, the HeadLossStats norms the full ones; the fused op
    at TP=2 (padded vocabulary, bias, class weights, softcap, every reduction) equals torch's cross-entropy."""
    for r in ranks:
        checks = r["loss_spec"]["checks"]
        assert sum(label.startswith("op tp=2") for label, _, _ in checks) == 4 * 3 * len(support_loss.OPTIONS)
        assert any(label.startswith("dense all m=1.0 tp=2 G") for label, _, _ in checks)
        for label, got, want in checks:
            torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-6, msg=label)
        assert all("\n" not in m and m for _, m in r["loss_spec"]["refusals"])


def test_trainer_trains_a_mixture_of_softmaxes_head(ranks):
    for r in ranks:
        t = r["train"]
        assert t["head"] == "MixtureOfSoftmaxesHead" and len(t["losses"]) == 12
        assert min(t["losses"][-3:]) < t["losses"][0] - 0.1, t["losses"]


def test_gradient_probe_on_nonlinear_heads_at_tp2_and_sp(ranks):
    """The training-time probe's general path with W vocab-sharded (and the head input sequence-sharded under
    SP, all-gathered for the sample): the same record on both ranks, equal to head_figures on the same tokens."""
    for r in ranks:
        assert len(r["probe_training"]) == 2 * len(support_heads.PROBE_CASES)
        for case, out in r["probe_training"].items():
            rec, want = out["record"], out["head_figures"]
            assert out["error"] is None and rec["probe_tokens"] == 20, case
            for key in ("destroyed_ratio", "visible_cosine", "update_cosine"):
                assert rec[key] == pytest.approx(want[key], rel=1e-7, abs=1e-12), (case, key)
            assert rec["grad_norm"] == pytest.approx(out["weight"] * want["grad_norm"], rel=1e-7), case
    assert ranks[0]["probe_training"] == ranks[1]["probe_training"]


def test_trainer_logs_the_probe_figures_of_a_mixture_of_softmaxes_head(ranks):
    """model.head_type: mos with the probe on (fused loss, TP=2 + SP): every step has the linear heads' figure
    names (destroyed_ratio, visible_cosine, grad_norm), update_cosine every 3rd step, plus cg_residual, and the
    reporting rank writes them to probe.jsonl."""
    for r in ranks:
        t = r["train"]
        assert t["probe_error"] is None
        assert [h["step"] for h in t["probe"]] == list(range(12))
        for h in t["probe"]:
            assert 0.0 < h["destroyed_ratio"] < 1.0 and math.isfinite(h["cg_residual"]), h
            assert h["visible_cosine"] == pytest.approx(math.sqrt(1 - h["destroyed_ratio"] ** 2), rel=1e-9)
            assert h["grad_norm"] > 0 and h["probe_tokens"] == 32
            assert ("update_cosine" in h) == (h["step"] % 3 == 0)
            if "update_cosine" in h:
                assert -1.0 <= h["update_cosine"] <= 1.0
    assert ranks[0]["train"]["probe"] == ranks[1]["train"]["probe"]
    assert [r["train"]["reporter"] for r in ranks] == [True, False]
    logged = ranks[0]["train"]["logged"]
    assert [x["step"] for x in logged] == list(range(12))
    assert all(x["probe/destroyed_ratio"] == h["destroyed_ratio"] for x, h in zip(logged, ranks[0]["train"]["probe"]))
