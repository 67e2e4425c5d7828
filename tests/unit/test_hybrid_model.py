"""HybridModel with the local hybrid stack spec (one process, TP = PP = 1): a ``*-*-`` model with every built-in
head equals the two-layer GPTModel with the same weights (losses to 1e-6, every gradient), with the fused loss
too; GradientProbe's record is the same on both; the builder's refusals are one line each (Mamba on CPU, other
layer symbols, a multi-token-prediction pattern / mtp_num_layers mismatch, a pattern / num_layers mismatch,
megatron-core 0.16). Multi-token prediction: tests/unit/test_mtp.py."""
import pytest
import torch

import megatron_bottleneck as mb
from tests import support, support_hybrid as sh
from tests.support import error_of


@sh.NEEDS_HYBRID
def test_every_builtin_kind_is_covered():
    from megatron_bottleneck.heads import registered_heads

    builtin = {"dense", "low_rank", "mos", "sigsoftmax", "softcap", "monotone", "stacked", "mfs", "mixtape",
               "decoupled"}
    assert builtin <= set(registered_heads())
    assert {k.split(":")[0] for k in sh.KINDS} == builtin


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", sh.KINDS)
def test_hybrid_with_each_head_equals_gpt_with_the_same_weights(kind):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    batch = support.batches(3)[0]
    g = sh.gpt(kind)
    h = sh.hybrid(kind)
    assert isinstance(h, HybridModel) and type(h.output_layer) is type(g.output_layer)
    assert [layer.__class__.__name__ for layer in h.decoder.layers] == ["TransformerLayer", "MLPLayer"] * 2
    assert type(h.decoder.final_norm).__name__ == "SequenceParallelNorm"
    sh.copy_weights(g, h)
    want, got = sh.loss_and_grads(g, batch), sh.loss_and_grads(h, batch)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0)
    assert 4.0 < got["loss"] < 7.0  # ~log 256 at initialisation: a real loss, not a zero
    assert set(got["grads"]) == set(want["grads"]) and sh.head_grads(got)
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name
    # the fused loss (where the head has one) on HybridModel: the same loss and head gradients
    mb.enable_fused_loss(h)
    assert type(h).__name__ == "FusedLossHybridModel"
    fused = sh.loss_and_grads(h, batch)
    assert fused["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=0)
    for name in sh.head_grads(want):
        torch.testing.assert_close(fused["grads"][name], want["grads"][name], rtol=1e-5, atol=1e-7, msg=name)


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", ["low_rank:r=8", "sigsoftmax"])
def test_the_probe_reads_hybrid_as_it_reads_gpt(kind):
    """The linear (low-rank) and the general (sigsoftmax) probe path: the same record on both models."""
    batch = support.batches(4)[1]
    g, h = sh.gpt(kind), sh.hybrid(kind)
    sh.copy_weights(g, h)
    want, got = sh.loss_and_grads(g, batch, probe=True)["record"], sh.loss_and_grads(h, batch, probe=True)["record"]
    assert want and set(got) == set(want)
    assert 0.0 < got["destroyed_ratio"] < 1.0
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
def test_build_hybrid_model_defaults_hooks_and_refusals():
    cfg = sh.config(4)
    default = mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ)
    assert default.hybrid_layer_pattern == "*-*-" and type(default.output_layer).__name__ == "ColumnParallelLinear"
    hooked = mb.head_hook("mos:k=2")([mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ)])
    assert type(hooked[0].output_layer).__name__ == "MixtureOfSoftmaxesHead"
    low = mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, head_rank=4, real_vocab_size=250, fused_loss=True)
    assert type(low).__name__ == "FusedLossHybridModel" and low.output_layer.vocab_size == 250
    tied = mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, share_embeddings_and_output_weights=True)
    assert "ties its input embedding" in error_of(lambda: mb.install_head(tied, "mos"))
    cases = [
        ("*M*-", cfg, "has Mamba 'M' layers, which need Mamba's CUDA kernels"),
        ("*E*-", cfg, "not 'E': pass Megatron's hybrid_stack_spec"),
        ("*-*-/*-", cfg, "hybrid layer pattern '*-*-/*-' declares 1 multi-token-prediction depths ('/'), "
                         "config.mtp_num_layers=None: set mtp_num_layers=1."),
        ("*-*-/", sh.config(4, mtp_num_layers=1), "every multi-token-prediction depth after '/' needs layer symbols"),
        ("*-*-*-", cfg, "config.num_layers=4 but hybrid layer pattern '*-*-*-' has 6 layers before any '/': set "
                        "num_layers=6."),
        ("", cfg, "must be a non-empty string"),
    ]
    vpp = sh.config(8, pp=2, virtual_pipeline_model_parallel_size=2)
    cases.append(("*-*-|*-*-", vpp, "has 2 pipeline segments ('|'), and pipeline_model_parallel_size=2 x "
                                    "virtual_pipeline_model_parallel_size=2 stages need one segment each."))
    for pattern, c, text in cases:
        message = error_of(lambda: mb.build_hybrid_model(c, support.VOCAB, support.SEQ, hybrid_layer_pattern=pattern))
        assert message.startswith("ConfigError: ") and text in message and "\n" not in message, message
    # on GPUs Mamba layers pass through to Megatron's TE Mamba layer: without TE that is one line too
    message = error_of(lambda: mb.local_hybrid_stack_spec(cfg, "*M*-", device="cuda"))
    assert message.startswith("ConfigError: Mamba 'M' layers (Megatron's Mamba layer spec) needs NVIDIA Transformer "
                              "Engine") and "\n" not in message, message
    spec = mb.local_hybrid_stack_spec(cfg, "*-|*-", device="cuda")  # no Mamba: the same local layers on GPUs
    assert spec.submodules.mlp_layer.submodules.pre_mlp_layernorm is mb.SequenceParallelNorm
    message = error_of(lambda: mb.build_hybrid_model(sh.config(3), support.VOCAB, support.SEQ))
    assert "give hybrid_layer_pattern explicitly" in message and "\n" not in message
    from megatron_bottleneck.models.hybrid import default_hybrid_pattern

    assert default_hybrid_pattern(8, 2) == "*-*-|*-*-" and default_hybrid_pattern(2) == "*-"
    assert "does not split into pipeline_model_parallel_size=3" in error_of(lambda: default_hybrid_pattern(4, 3))


@pytest.mark.skipif(sh.HAS_HYBRID, reason="megatron-core >= 0.19 has HybridModel")
def test_megatron_core_016_is_refused_in_one_line():
    import torch.distributed  # noqa: F401  (build_hybrid_model refuses before any parallel state is needed)

    message = error_of(lambda: mb.build_hybrid_model(sh.config(4), support.VOCAB, support.SEQ))
    assert message.startswith("ConfigError: HybridModel needs megatron-core >= 0.19 (installed: 0.16")
    assert "\n" not in message


@sh.NEEDS_HYBRID
@pytest.mark.usefixtures("megatron_one_rank")
def test_the_spec_object_for_megatron_lm_builds_the_same_model_and_refuses_other_layers():
    """LOCAL_HYBRID_STACK_SPEC (Megatron-LM's --spec imports an object) builds what local_hybrid_stack_spec(config,
    pattern) builds, the norms following config.normalization (RMSNorm here); a layer symbol it has no layer for
    (Megatron's stack would build a do-nothing IdentityOp) is one line."""
    from megatron_bottleneck.models.hybrid import LOCAL_HYBRID_STACK_SPEC

    cfg = sh.config(4)
    built = []
    for spec in (LOCAL_HYBRID_STACK_SPEC, None):
        torch.manual_seed(5)
        built.append(mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, stack_spec=spec).state_dict())
    assert built[0].keys() == built[1].keys()
    for k, v in built[0].items():
        if torch.is_tensor(v):
            assert torch.equal(v, built[1][k]), k
    model = mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, stack_spec=LOCAL_HYBRID_STACK_SPEC)
    norms = [m for m in model.modules() if isinstance(m, mb.SequenceParallelNorm)]
    assert len(norms) == 5 and all(n.rms and n.bias is None for n in norms)  # 2 attention + 2 MLP layers + final
    message = error_of(lambda: mb.build_hybrid_model(cfg, support.VOCAB, support.SEQ, hybrid_layer_pattern="*M*-",
                                                     stack_spec=LOCAL_HYBRID_STACK_SPEC))
    assert message.startswith("ConfigError: hybrid layer pattern symbol(s) 'M': this local hybrid stack spec has no "
                              "such layer") and "\n" not in message, message
