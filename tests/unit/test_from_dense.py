"""``init=from_dense`` (issue 26): refused in one line naming ``convert-head`` wherever the head is installed before a
checkpoint loads (trainer config, Megatron-LM flags, pre-wrap hooks, model builders); on loaded weights the factors
read the shard in row blocks and give the best rank-r approximation (float64 SVD)."""
import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.errors import ConfigError, HeadConfigError
from megatron_bottleneck.heads import low_rank
from megatron_bottleneck.integrations.megatron_lm import check_arguments
from megatron_bottleneck.train import TrainConfig
from tests import support

FIX = "run `megatron-bottleneck convert-head CHECKPOINT --head low_rank:r=R --out DIR`"


def _one_line(exc_info, where):
    text = str(exc_info.value)
    assert "\n" not in text and text.startswith(where) and FIX in text, text


def test_the_trainer_config_refuses_it():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"head_rank": 8, "head_init": "from_dense"}})
    _one_line(e, "model.head_init=from_dense")
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"model": {"head_type": "low_rank", "head_options": {"r": 8, "init": "from_dense"}}})
    _one_line(e, "model.head_init=from_dense")


@pytest.mark.parametrize("flags", [["--lm-head-rank", "8", "--lm-head-init", "from_dense"],
                                   ["--lm-head-type", "low_rank", "--lm-head-options", "r=8,init=from_dense"]])
def test_the_megatron_lm_flags_refuse_it(flags):
    with pytest.raises(HeadConfigError) as e:
        check_arguments(["--hidden-size", "64", "--untie-embeddings-and-output-weights", *flags])
    _one_line(e, "--lm-head-init from_dense")


def test_the_pre_wrap_hooks_refuse_it():
    with pytest.raises(HeadConfigError) as e:
        mb.head_hook("low_rank:r=4,init=from_dense")
    _one_line(e, "head_hook")
    with pytest.raises(HeadConfigError) as e:
        mb.low_rank_head_hook(mb.LowRankHeadConfig(rank=4, init="from_dense"))
    _one_line(e, "low_rank_head_hook")
    assert callable(mb.low_rank_head_hook(mb.LowRankHeadConfig(rank=4)))


@pytest.mark.usefixtures("megatron_one_rank")
def test_the_model_builder_refuses_it_and_a_loaded_model_converts(monkeypatch):
    with pytest.raises(HeadConfigError) as e:
        mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ,
                           head=mb.LowRankHeadConfig(rank=4, init="from_dense"))
    _one_line(e, "a model builder")
    model = mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ)
    with torch.no_grad():  # a head with a decaying spectrum, as trained heads have (distinct singular values)
        model.output_layer.weight.mul_(torch.logspace(0, -2, support.HIDDEN))
    w = model.output_layer.weight.detach().double().clone()
    monkeypatch.setattr(low_rank, "ROW_BLOCK", 37)  # several blocks, the last one partial
    torch.testing.assert_close(low_rank.dense_gram(model.output_layer.weight), w.t() @ w, rtol=1e-12, atol=1e-12)
    mb.install_low_rank_head(model, mb.LowRankHeadConfig(rank=5, init="from_dense"))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(model.output_layer.dense_weight().double(), best, rtol=0, atol=1e-6)
