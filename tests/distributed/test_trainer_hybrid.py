"""The trainer with ``model.arch: hybrid`` on real CPU ranks (one spawn of 2 ranks, PP = 2, pattern ``*-|*-``
from the default): HybridModel chunks with the mos head and the fused loss, the probe on the last stage, the loss
going down; the checkpoint's layout records the arch and a resume continues from it, while the same checkpoint
refuses a run with ``model.arch: gpt`` in one line."""
import json
import os

import pytest

import megatron_bottleneck as mb
from tests import support_hybrid as sh

pytestmark = sh.NEEDS_HYBRID


def hybrid_runs(root, data):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from megatron_bottleneck.base.errors import CheckpointError
    from megatron_bottleneck.train import Trainer
    from tests.distributed import trainer_ranks as tr

    def config(steps, arch="hybrid"):  # resumed with more steps: follow this config's schedule
        return tr.config(os.path.join(root, "logs"), data, ckpt=os.path.join(root, "ckpt"), steps=steps,
                         model={"arch": arch, "num_layers": 2, "head_rank": None, "head_type": "mos",
                                "head_options": {"k": 2}, "fused_loss": True},
                         parallel={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 2},
                         checkpoint={"save_interval": 6, "async_save": False, "scheduler": "config"},
                         optim={"lr": 3e-2, "warmup_steps": 1}, probe={"interval": 1})

    trainer = Trainer(config(6))
    inner = [getattr(m, "module", m) for m in trainer.models]
    out = {"classes": [isinstance(m, HybridModel) for m in inner],
           "pattern": inner[0].hybrid_layer_pattern,
           "layers": [layer.layer_number for layer in inner[0].decoder.layers],
           "head": type(mb.find_head(trainer.models)).__name__ if mb.find_head(trainer.models) is not None else None,
           "layout_arch": trainer.layout()["model"].get("model.arch")}
    first = trainer.train()
    out["losses"] = [h["loss"] for h in first["history"]]
    out["probe"] = list(trainer.probe.history)
    resumed = Trainer(config(8))
    out["resumed_from"] = resumed.iteration
    out["resumed"] = resumed.train()["iteration"]
    try:
        Trainer(config(8, arch="gpt"))
        out["gpt_error"] = "no error"
    except CheckpointError as exc:
        out["gpt_error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spamlang):
    return mb.launch(hybrid_runs, 2, str(tmp_path_factory.mktemp("trainer_hybrid")), spamlang, timeout=900)


def test_the_trainer_builds_and_trains_hybrid_and_resumes_it(runs):
    by_stage = sorted(runs, key=lambda r: r["layers"])
    assert [r["layers"] for r in by_stage] == [[1, 2], [3, 4]]
    for r in runs:
        assert r["classes"] == [True] and r["pattern"] == "*-|*-" and r["layout_arch"] == "hybrid"
        assert r["resumed_from"] == 6 and r["resumed"] == 8
        assert r["gpt_error"].startswith("cannot resume from") and "model.arch" in r["gpt_error"], r["gpt_error"]
        assert "\n" not in r["gpt_error"]
    last = by_stage[-1]
    assert last["head"] == "MixtureOfSoftmaxesHead" and by_stage[0]["head"] is None
    losses = [x for x in last["losses"] if x is not None]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert last["probe"] and all(0.0 < rec["destroyed_ratio"] < 1.0 for rec in last["probe"])
    assert [rec["step"] for rec in last["probe"]] == list(range(6))  # the trainer's steps, begun and ended by it
