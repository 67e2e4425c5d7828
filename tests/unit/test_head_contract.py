"""The head contract (base.head.LMHead) and the fused model classes: who implements it, what is refused in one
line, MuP's logit scale inside the fused loss, and the probe's recomputed logit gradient against autograd."""
import re

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.head import LMHead, is_lm_head


from megatron_bottleneck import heads as H
from megatron_bottleneck.ops import linear_cross_entropy_reference, logit_grad_rows
from tests import support


def _model(megatron_one_rank, rank=None, **config):
    return mb.build_gpt_model(support.config(**config), support.VOCAB, support.SEQ, head_rank=rank)


def test_both_heads_implement_the_contract(megatron_one_rank):
    low = _model(megatron_one_rank, 8).output_layer
    dense = _model(megatron_one_rank).output_layer
    assert is_lm_head(low) and not is_lm_head(dense)  # a plain ColumnParallelLinear until converted
    H.as_lm_head(dense, support.VOCAB - 5)
    assert isinstance(dense, H.DenseOutputLayer) and isinstance(dense, LMHead) and dense.vocab_size == support.VOCAB - 5
    assert dense.probe_view().mix is None and low.probe_view().mix.shape == (8, support.HIDDEN)


def test_fused_model_is_a_class_not_an_instance_patch(megatron_one_rank):
    model = _model(megatron_one_rank, 8)
    cls = type(model)
    for bad, message in ((dict(reduction="mean"), "reduction='mean' in a model"),
                         (dict(return_z_loss=True), "return_z_loss=True in a model"),
                         (dict(ce_weight=(1.0, 2.0)), "ce_weight has 2 class weights, the model's vocabulary")):
        with pytest.raises(mb.HeadConfigError, match=re.escape(message)):  # Megatron's loss function reduces
            H.enable_fused_loss(model, H.FusedLossConfig(**bad))
    enable_fused = H.enable_fused_loss(model)
    assert isinstance(enable_fused, H.FusedLossModel) and type(model).__name__ == "FusedLossGPTModel"
    assert "forward" not in vars(model) and "compute_language_model_loss" not in vars(model)
    H.disable_fused_loss(model)
    assert type(model) is cls


@pytest.mark.parametrize("flag", ["cross_entropy_loss_fusion"])
def test_megatrons_own_fused_cross_entropy_is_refused_in_one_line(megatron_one_rank, flag):
    model = _model(megatron_one_rank, 8, **{flag: True})
    with pytest.raises(mb.HeadConfigError) as err:
        H.enable_fused_loss(model)
    assert "\n" not in str(err.value) and re.search(rf"{flag}=True .* set {flag}=False", str(err.value))


def test_fused_loss_hook_turns_megatrons_fused_cross_entropy_off_with_one_warning(megatron_one_rank, caplog):
    """Megatron-Bridge turns cross_entropy_loss_fusion on by default: the pre-wrap hook turns it off, one line."""
    model = _model(megatron_one_rank, 8, cross_entropy_loss_fusion=True)
    with caplog.at_level("WARNING", logger="megatron_bottleneck"):
        assert mb.fused_loss_hook()([model]) == [model]
    assert isinstance(model, H.FusedLossModel) and model.config.cross_entropy_loss_fusion is False
    warned = [r.getMessage() for r in caplog.records if "cross_entropy_loss_fusion" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    caplog.clear()
    mb.fused_loss_hook()([_model(megatron_one_rank, 8)])  # already off: silent
    assert not [r for r in caplog.records if "cross_entropy_loss_fusion" in r.getMessage()]


def test_a_head_the_fused_loss_cannot_drive_is_refused(megatron_one_rank):
    with pytest.raises(mb.HeadConfigError, match="cannot drive"):
        H.as_lm_head(torch.nn.Linear(4, 8))


def test_mup_logit_scale_is_inside_the_fused_loss(megatron_one_rank):
    """MuP scales the logits after the head (``_scale_logits``, megatron-core 0.19): the fused loss folds the
    scale into its input, so fused and unfused losses agree."""
    cfg = support.config()
    if not hasattr(cfg, "use_mup"):
        pytest.skip(f"this megatron-core has no MuP (use_mup)")
    cfg = support.config(use_mup=True, mup_base_hidden_size=support.HIDDEN // 2)
    assert cfg.mup_output_mult != 1.0
    model = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head_rank=8)
    b = support.batches()[0]
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    unfused = model(b["tokens"], pos, None, labels=b["labels"])
    H.enable_fused_loss(model)
    fused = model(b["tokens"], pos, None, labels=b["labels"])
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_a_gemma_style_softcapped_output_layer_gets_the_fused_loss(megatron_one_rank):
    """A model config carrying ``final_logit_softcapping`` and its output layer extended to cap the logits, as
    Megatron-Bridge's Gemma 2 / 3 providers build them (``extend_instance(model.output_layer, Gemma2OutputLayer)``):
    enable_fused_loss converts the layer and the fused loss (softcap inside) equals Megatron's cross-entropy of the
    capped logits, loss and every gradient."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class Gemma2StyleOutputLayer(ColumnParallelLinear):  # what Bridge mixes into the output layer
        def forward(self, *args, **kwargs):
            out, bias = super().forward(*args, **kwargs)
            c = self.config.final_logit_softcapping
            return c * torch.tanh(out / c), bias

    cfg = support.config()
    cfg.final_logit_softcapping = 0.5  # small: the cap bends this tiny model's logits
    model = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ)
    layer = model.output_layer
    layer.__class__ = type(type(layer).__name__, (Gemma2StyleOutputLayer, type(layer)), {})
    b = support.batches()[0]
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    runs = []
    for fused in (False, True):
        if fused:
            H.enable_fused_loss(model)
        model.zero_grad()
        loss = model(b["tokens"], pos, None, labels=b["labels"])
        loss.sum().backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert isinstance(model.output_layer, H.DenseOutputLayer)
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    uncapped = mb.heads.FusedLossConfig(softcap=1e9)  # a cap that does nothing: another loss
    model.fused_loss_config = uncapped
    assert not torch.allclose(model(b["tokens"], pos, None, labels=b["labels"]), l0, rtol=1e-3)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def _probed_step(model, fused: bool, update: bool):
    """One forward-backward of ``model`` (fused or not) under a fresh probe: its figures."""
    if fused:
        H.enable_fused_loss(model)
    else:
        H.disable_fused_loss(model)
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=int(update), vocab_size=support.VOCAB,
                                            general_tokens=support.MICRO * support.SEQ, general_iterations=64))
    probe.watch(model, num_microbatches=1)
    model.zero_grad()
    b = support.batches()[0]
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    model(b["tokens"], pos, None, labels=b["labels"]).mean().backward()
    probe.end_step()
    (figures,) = probe.history
    probe.remove()
    assert probe.last_error is None, probe.last_error
    return figures


@pytest.mark.parametrize("head", [8, None, "stacked:width=48,activation=tanh", "softcap"],
                         ids=["low_rank", "dense", "stacked", "dense-softcap"])
def test_mup_fused_and_unfused_probe_figures_are_equal(megatron_one_rank, head):
    """MuP multiplies the head's logits z by c = mup_output_mult after the head (megatron-core 0.19), and the
    fused loss folds c into its input, so its hooked dL/dH carries c: the fused probe takes G = c dL/d(c z) (the
    gradient at z, what the unfused probe hooks) in ||G||^2 and in the update slice, the general probe (stacked
    head) p = softmax(c u) and G = c w (p - q). Fused and unfused figures then agree (1e-5); before, ||G||^2
    lacked the c^2 that the visible energy (from dL/dH) carried, so the fused destroyed ratio differed.

    dense-softcap (no MuP; Gemma's final_logit_softcapping c on the config, the unfused DenseOutputLayer outputs
    c tanh(z / c)): both paths take G at z through the cap; before, the unfused probe took dL/dx at the capped
    output and its figures differed from the fused ones."""
    cfg = support.config()
    if head == "softcap":
        cfg.final_logit_softcapping, head = 0.5, None  # small: the cap bends this tiny model's logits
    elif not hasattr(cfg, "use_mup"):
        from importlib.metadata import version

        pytest.skip(f"megatron-core {version('megatron-core')} has no MuP (TransformerConfig.use_mup, added after "
                    f"0.16; the 3.12 lane's 0.19 runs this test)")
    else:
        cfg = support.config(use_mup=True, mup_base_hidden_size=support.HIDDEN // 2)
        assert cfg.mup_output_mult != 1.0
    kw = {"head_rank": head} if not isinstance(head, str) else {"head": head}
    torch.manual_seed(0)
    model = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, **kw)
    H.as_lm_head(model.output_layer)  # the unfused dense head caps its logits as Bridge's Gemma output layer does
    general = isinstance(head, str)
    unfused = _probed_step(model, False, update=True)
    fused = _probed_step(model, True, update=True)
    keys = ["grad_norm", "destroyed_ratio", "visible_cosine", "update_cosine"] + \
        ([] if general else ["hidden_grad_norm"])
    for key in keys:
        assert fused[key] == pytest.approx(unfused[key], rel=1e-5), (key, fused[key], unfused[key])
    assert 0.0 < fused["destroyed_ratio"] < 0.999


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss_weight": 1e-2}, {"vocab_size": 90}])
def test_recomputed_logit_gradient_equals_autograd(kw):
    gen = torch.Generator().manual_seed(0)
    t, k, v = 24, 8, 101
    u = torch.randn(t, k, generator=gen, dtype=torch.float64)
    w = torch.randn(v, k, generator=gen, dtype=torch.float64)
    vocab = kw.get("vocab_size", v)
    y = torch.randint(0, vocab, (t,), generator=gen)
    y[::5] = -100
    g = torch.rand(t, generator=gen, dtype=torch.float64)
    logits = []
    loss = linear_cross_entropy_reference(u.requires_grad_(), w, y, logits_out=logits, **kw)
    (loss.double() * g).sum().backward()
    want = logits[0].grad  # [t, V real]
    lse = torch.logsumexp(logits[0].detach(), dim=-1)
    for start, stop in ((0, 60), (60, v)):  # two vocab shards, the second with the padding
        got = logit_grad_rows(u.detach().float(), w[start:stop].float(), y, lse.float(), g.float(),
                              vocab_start=start, vocab_size=vocab, label_smoothing=kw.get("label_smoothing", 0.0),
                              z_loss_weight=kw.get("z_loss_weight", 0.0))
        real = max(0, min(stop, vocab) - start)
        torch.testing.assert_close(got[:, :real].double(), want[:, start:start + real].double(), rtol=1e-4, atol=1e-6)
        assert got[:, real:].abs().max() == 0 if real < stop - start else True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recomputed_logit_gradient_in_16_bit_is_as_accurate_as_the_unfused_path(dtype):
    """The probe's G on a fused model (16-bit u and W, lse from the fused pass) against float64, side by side
    with the G an unfused 16-bit head hands the probe today, on trained-like inputs (Zipfian labels, peaked
    logits)."""
    from megatron_bottleneck.ops import HeadLossStats, linear_cross_entropy
    from megatron_bottleneck.ops.reference import peaked_zipf_problem

    u, w, y = peaked_zipf_problem(1024, 64, 2048, ignore_every=17, dtype=dtype)
    g = torch.full((1024,), 1.0 / 1024, dtype=torch.float64)  # a token-mean loss
    logits64 = (u.double() @ w.double().t()).requires_grad_()
    (torch.nn.functional.cross_entropy(logits64, y, ignore_index=-100, reduction="none") * g).sum().backward()
    want = logits64.grad
    # the unfused path's logit gradient, as autograd gives it to the probe's hook
    z = (u @ w.t()).requires_grad_()
    (torch.nn.functional.cross_entropy(z.float(), y, ignore_index=-100, reduction="none") * g.float()).sum().backward()
    unfused = z.grad
    stats = HeadLossStats()
    linear_cross_entropy(u, w, y, stats=stats, check_labels=False)
    got = logit_grad_rows(u, w, y, stats.lse, g.float(), vocab_start=0, vocab_size=2048)

    def err(a):
        return float((a.double() - want).norm() / want.norm())

    assert err(got) <= 1.1 * err(unfused) + 1e-6, (err(got), err(unfused))
    assert err(got) < 2e-2  # absolute: bf16 logits with p_y ~ 0.9
