"""Every built-in head on real TP ranks (gloo, CPU), in one spawn of 2 ranks: forward, loss and gradients at
TP=2 and TP=2 + SP equal the single-process float64 reference (fused == materialised where fused exists), the
general probe's log_prob_fn (value, VJP, JVP under torch.func) at TP=2, and checkpoints saved at TP=2 load at
TP=1 (same full parameters)."""
import torch

import megatron_bottleneck as mb
from tests import support_heads


def test_heads_at_tp2_and_sp_and_checkpoint_to_tp1(tmp_path):
    results = mb.launch(support_heads.heads_on_layout, 2, 2, True, str(tmp_path), timeout=400)
    labels = set()
    for per_rank in results:
        for label, got, want in per_rank:
            labels.add(label)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-6, msg=label)
    for kind in support_heads.KINDS:
        for part in ("loss", "forward", "log_prob_fn VJP dh", "log_prob_fn JVP", "checkpoint"):
            assert any(x.startswith(f"{kind} {part}") for x in labels), (kind, part)
    assert any("sp=True" in x for r in results for x, _, _ in r)


def train_mos(log_dir, data, probe):
    """A few trainer steps with model.head_type: mos at TP=2 + SP (fused loss)."""
    from megatron_bottleneck.train import Trainer
    from tests.distributed import trainer_ranks as tr

    cfg = tr.config(log_dir, data, steps=12, probe=probe,
                    model={"head_rank": None, "head_type": "mos", "head_options": {"k": 2}, "fused_loss": True},
                    parallel={"sequence_parallel": True}, checkpoint={"dir": None},
                    optim={"lr": 3e-2, "warmup_steps": 1})
    trainer = Trainer(cfg)
    head = mb.find_head(trainer.models)
    out = trainer.train()
    return {"head": type(head).__name__, "losses": [h["loss"] for h in out["history"]]}


def test_trainer_trains_a_mixture_of_softmaxes_head(tmp_path, spamlang):
    for r in mb.launch(train_mos, 2, str(tmp_path / "on"), spamlang, {"interval": 0}, timeout=400):
        assert r["head"] == "MixtureOfSoftmaxesHead" and len(r["losses"]) == 12
        assert min(r["losses"][-3:]) < r["losses"][0] - 0.1, r["losses"]
