"""The head's parameters carry Megatron's tags, on GPTModel and (megatron-core >= 0.19) HybridModel, for every
built-in head: Megatron's own optimizer (``get_megatron_optimizer`` with a decoupled learning rate, through Megatron
DDP) puts each head parameter in a group with the dense output weight's learning rates, and the hidden weights
elsewhere; Muon's routing (0.19) leaves every head parameter to Adam as it does the dense output weight; under MuP
(0.19, ``use_mup``) every head parameter carries the embedding-class tag the dense output weight carries.
(``sequence_parallel`` on the replicated parameters under TP = 2 + SP: tests/distributed/test_hybrid.py.)"""
import pytest
import torch

import megatron_bottleneck as mb
from tests import support, support_hybrid as sh

LR, MIN_LR, DECOUPLED_LR, DECOUPLED_MIN_LR = 1e-3, 1e-4, 7e-3, 7e-4
BUILDERS = ["gpt", pytest.param("hybrid", marks=sh.NEEDS_HYBRID)]


def build(arch, kind, **config_kw):
    if arch == "gpt":
        cfg = sh.config(2, **config_kw)
        return mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head=mb.HeadConfig.parse(kind, seed=7)), cfg
    cfg = sh.config(4, **config_kw)
    return mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, hybrid_layer_pattern="*-*-",
                                 head=mb.HeadConfig.parse(kind, seed=7)), cfg


def lr_of_every_parameter(model, cfg):
    """{name: (max_lr, min_lr)} of the group Megatron's optimizer puts each parameter in."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    (ddp,) = support.wrap_ddp(cfg, [model])
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=MIN_LR, decoupled_lr=DECOUPLED_LR,
                        decoupled_min_lr=DECOUPLED_MIN_LR, weight_decay=0.1, bf16=False,
                        params_dtype=torch.float32, use_distributed_optimizer=False), [ddp])
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {name: (group_of[id(p)]["max_lr"], group_of[id(p)]["min_lr"]) for name, p in model.named_parameters()}


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("arch", BUILDERS)
def test_megatron_optimizer_groups_each_head_parameter_with_the_dense_output_weight(arch):
    dense = lr_of_every_parameter(*build(arch, "dense"))
    want = dense["output_layer.weight"]
    assert want == (DECOUPLED_LR, DECOUPLED_MIN_LR)
    assert dense["decoder.layers.0.self_attention.linear_qkv.weight"] == (LR, MIN_LR)
    for kind in sh.KINDS[1:]:
        model, cfg = build(arch, kind)
        n_head = len(list(model.output_layer.parameters()))
        got = lr_of_every_parameter(model, cfg)
        head = {n: lr for n, lr in got.items() if n.startswith("output_layer.")}
        assert len(head) == n_head and (n_head > 1 or kind.startswith(("sigsoftmax", "softcap"))), (kind, head)
        assert all(lr == want for lr in head.values()), (kind, head)
        assert got["decoder.layers.0.self_attention.linear_qkv.weight"] == (LR, MIN_LR)
        assert got["embedding.word_embeddings.weight"] == want


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("arch", BUILDERS)
def test_muon_routing_and_mup_tags_follow_the_dense_output_weight(arch):
    layer_wise = pytest.importorskip("megatron.core.optimizer.layer_wise_optimizer",
                                     reason="Muon's layer-wise routing is in megatron-core >= 0.19")
    routed = getattr(layer_wise, "is_managed_by_layer_wise_optimizer", None)
    if routed is None:
        pytest.skip("Muon's layer-wise routing (is_managed_by_layer_wise_optimizer) is in megatron-core >= 0.19")
    from megatron.core.transformer import TransformerConfig

    if "use_mup" not in TransformerConfig.__dataclass_fields__:
        pytest.skip("this megatron-core has no MuP")
    for use_mup in (False, True):
        extra = {"use_mup": True, "mup_base_hidden_size": support.HIDDEN // 2} if use_mup else {}
        dense, _ = build(arch, "dense", **extra)
        weight = dense.output_layer.weight
        assert getattr(weight, "is_embedding_parameter", False) is use_mup
        assert not routed(weight) and routed(dense.decoder.layers[0].self_attention.linear_qkv.weight)
        for kind in sh.KINDS[1:]:
            model, _ = build(arch, kind, **extra)
            for name, p in model.output_layer.named_parameters():
                assert p.is_embedding_or_output_parameter is True, (kind, name)
                assert getattr(p, "is_embedding_parameter", False) is use_mup, (kind, name, use_mup)
                assert not routed(p), (kind, name)
