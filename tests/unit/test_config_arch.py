"""``model.arch: gpt | hybrid`` in the trainer's config: the default HybridModel pattern per pipeline layout (the gpt
model's weights from the same seed, under other names), and
one-line refusals (a pattern with arch gpt, FP8 with hybrid, other layer symbols, a stage count that does not match
PP x VPP, megatron-core 0.16); a gpt run's checkpoint layout has no new keys (older checkpoints still resume)."""
import dataclasses

import pytest

from megatron_bottleneck.train import TrainConfig
from tests import support_hybrid as sh
from tests.support import error_of


def cfg(model=None, parallel=None):
    return TrainConfig.from_dict({"model": dict(model or {}), "parallel": dict(parallel or {})})


@sh.NEEDS_HYBRID
def test_default_patterns_and_refusals():
    c = cfg({"arch": "hybrid", "num_layers": 4})
    c.validate()
    assert c.hybrid_pattern() == "*-*-*-*-" and cfg().hybrid_pattern() is None
    assert cfg({"arch": "hybrid", "num_layers": 4}, {"pipeline_model_parallel_size": 2}).hybrid_pattern() == "*-*-|*-*-"
    assert cfg({"arch": "hybrid", "num_layers": 4}, {"pipeline_model_parallel_size": 2,
                                                     "virtual_pipeline_model_parallel_size": 2}).hybrid_pattern() \
        == "*-|*-|*-|*-"
    given = cfg({"arch": "hybrid", "hybrid_layer_pattern": "**--"})
    given.validate()
    assert given.hybrid_pattern() == "**--"
    cases = [
        ({"hybrid_layer_pattern": "*-"}, {}, "model.hybrid_layer_pattern is for model.arch=hybrid"),
        ({"arch": "hybrid", "fp8": "delayed"}, {}, "with model.arch=hybrid set fp8=null"),
        ({"arch": "hybrid", "hybrid_layer_pattern": "*M-"}, {}, "attention '*' and MLP '-' layers"),
        ({"arch": "hybrid", "hybrid_layer_pattern": "*-*-"}, {"pipeline_model_parallel_size": 2},
         "has 1 stage segments ('|'), and this run has 2 pipeline stages"),
        ({"arch": "hybrid", "num_layers": 3}, {"pipeline_model_parallel_size": 2},
         "model.num_layers=3 does not split evenly into 2 pipeline stages"),
        ({"arch": "mamba"}, {}, "model.arch"),
    ]
    for model, parallel, text in cases:
        message = error_of(lambda: cfg(model, parallel).validate())
        assert message.startswith("ConfigError: ") and text in message and "\n" not in message, message


def test_a_gpt_run_keeps_the_checkpoint_layout_of_older_versions():
    from megatron_bottleneck.train.trainer import PRE_HYBRID_DEFAULTS, RESUMABLE_MODEL_KEYS

    c = cfg()
    assert c.model.arch == "gpt" and c.model.hybrid_layer_pattern is None
    keys = {k for k, v in dataclasses.asdict(c.model).items()
            if k not in RESUMABLE_MODEL_KEYS and (k, v) not in PRE_HYBRID_DEFAULTS}
    assert "arch" not in keys and "hybrid_layer_pattern" not in keys and "num_layers" in keys


@pytest.mark.skipif(sh.HAS_HYBRID, reason="megatron-core >= 0.19 has HybridModel")
def test_arch_hybrid_on_megatron_core_016_is_one_line():
    message = error_of(lambda: cfg({"arch": "hybrid"}).validate())
    assert message.startswith("ConfigError: model.arch=hybrid: HybridModel needs megatron-core >= 0.19")
    assert "\n" not in message


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
def test_the_trainers_hybrid_model_is_its_gpt_model_under_other_names():
    """The same seed draws the same weights for model.arch gpt and hybrid (default pattern): the output projections'
    scaled init uses the transformer's num_layers, not the hybrid layer count."""
    import torch

    from megatron_bottleneck.train.trainer import build_models

    params = {}
    for arch in ("gpt", "hybrid"):
        c = cfg({"arch": arch, "num_layers": 2, "head_rank": 8, "init_method_std": 0.3})
        c.validate()
        torch.manual_seed(5)
        _, (model,) = build_models(c)
        name = sh.gpt_name if arch == "hybrid" else (lambda n: n)
        params[arch] = {name(n): p.detach() for n, p in model.named_parameters()}
    assert sorted(params["gpt"]) == sorted(params["hybrid"])
    fc2 = "decoder.layers.1.mlp.linear_fc2.weight"
    assert params["gpt"][fc2].std() < 0.3 / 1.5  # scaled: 0.3 / sqrt(2 x 2)
    for n, p in params["gpt"].items():
        torch.testing.assert_close(params["hybrid"][n], p, rtol=0, atol=0, msg=n)
