"""The head plug-ins in one process: every built-in head at TP=1 against its float64 reference (forward, loss,
gradients, fused == materialised, log_prob_fn's value / VJP / JVP), the registry's and HeadConfig's one-line
refusals, install_head / head_hook / build_gpt_model, the linear probe's refusal of a non-linear head."""
import re

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.head import HeadConfig, check_head, register_head
from tests import support, support_heads

pytestmark = pytest.mark.usefixtures("megatron_one_rank")


def test_every_builtin_head_matches_its_float64_reference_at_tp1():
    results = support_heads.check_heads()
    assert len(results) > 50
    for label, got, want in results:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-6, msg=label)


error_of = support.error_of


class IncompleteHead(torch.nn.Module):
    """Has the common attributes and a loss, but neither probe_view nor log_prob_fn, nor sharded_state_dict."""

    tp_group, sequence_parallel, vocab_size, last_loss = None, False, 10, None

    def __init__(self):
        super().__init__()
        self.loss_request = mb.LossRequest()

    def loss(self, hidden, labels, weight=None, **kw):
        return hidden.sum(-1)


def test_the_registry_refuses_an_incomplete_head_in_one_line():
    register_head("incomplete_for_test", lambda ctx, o: IncompleteHead(), replace=True)
    model = mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ)
    message = error_of(lambda: mb.install_head(model, "incomplete_for_test"))
    assert re.fullmatch(r"HeadConfigError: head kind 'incomplete_for_test' \(IncompleteHead\) does not implement the "
                        r"head contract: it lacks sharded_state_dict, probe_view \(linear head\) or log_prob_fn "
                        r"\(non-linear head\) \(see megatron_bottleneck.base.head\)", message), message
    assert "lacks forward" not in message and "\n" not in message
    assert "lacks tp_group, sequence_parallel, vocab_size, loss_request, last_loss, loss, " in error_of(
        lambda: check_head(torch.nn.Linear(2, 3)))


@pytest.mark.parametrize("call,pattern", [
    (lambda: register_head("Bad-Name", lambda c, o: None), r"must be a lower-case identifier"),
    (lambda: register_head("mos", lambda c, o: None), r"'mos' is already registered \(pass replace=True"),
    (lambda: register_head("x_head", 3), r"the builder 3 is not callable"),
    (lambda: register_head("x_head", lambda c, o: None, options=dict), r"options must be a dataclass type"),
    (lambda: HeadConfig.parse("moss:k=2").resolved_options(), r"unknown head kind 'moss': known kinds are dense, "
                                                              r"low_rank, mos, sigsoftmax, softcap, monotone, stacked"),
    (lambda: HeadConfig.parse("mos:q=2").resolved_options(), r"head kind 'mos' has no option 'q' \(its options: k, "
                                                             r"proj_std, fused\)"),
    (lambda: HeadConfig.parse("mos:k=two").resolved_options(), r"option k='two' is not an int"),
    (lambda: HeadConfig.parse("mos:k=0").resolved_options(), r"head kind 'mos': k must be an integer >= 1, got 0"),
    (lambda: HeadConfig.parse("mos:k").resolved_options(), r"option 'k' is not name=value"),
    (lambda: HeadConfig.parse("low_rank").resolved_options(), r"head kind 'low_rank' needs option r"),
    (lambda: HeadConfig.parse("stacked:activation=swish").resolved_options(), r"activation='swish' is not one of "
                                                                              r"gelu, tanh, relu"),
    (lambda: HeadConfig.parse("softcap:cap=-1").resolved_options(), r"cap must be > 0, got -1.0"),
    (lambda: HeadConfig.parse(":k=2"), r"give a kind"),
])
def test_head_config_and_registry_errors_are_one_line(call, pattern):
    message = error_of(call)
    assert message.startswith("HeadConfigError: ") and "\n" not in message and re.search(pattern, message), message


def test_parse_and_options():
    head = HeadConfig.parse(" mos : k = 3 , fused=false", seed=4)
    assert (head.kind, head.options, head.seed, str(head)) == ("mos", {"k": "3", "fused": "false"}, 4,
                                                               "mos:k=3,fused=false")
    opts = head.resolved_options()
    assert (opts.k, opts.fused, opts.proj_std) == (3, False, None)


def test_install_head_build_gpt_model_and_the_pre_wrap_hook():
    cfg = support.config()
    built = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head=HeadConfig("mos", {"k": 2}))
    assert type(built.output_layer).__name__ == "MixtureOfSoftmaxesHead" and built.output_layer.k == 2
    hooked = mb.head_hook("stacked:width=40")([mb.build_gpt_model(cfg, support.VOCAB, support.SEQ) for _ in range(2)])
    assert [(type(m.output_layer).__name__, m.output_layer.width) for m in hooked] == [("StackedHead", 40)] * 2
    assert "already has a MixtureOfSoftmaxesHead" in error_of(lambda: mb.install_head(built, "sigsoftmax"))
    tied = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, share_embeddings_and_output_weights=True)
    assert "ties its input embedding" in error_of(lambda: mb.install_head(tied, "mos"))
    # the low_rank kind is the LowRankHeadConfig path: the same head from the same seed
    a = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head=mb.LowRankHeadConfig(rank=4, seed=9)).output_layer
    b = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head=HeadConfig("low_rank", {"r": 4}, seed=9)).output_layer
    assert torch.equal(a.weight, b.weight) and torch.equal(a.input_proj, b.input_proj)
    # dense keeps Megatron's head, with the contract
    dense = mb.install_head(mb.build_gpt_model(cfg, support.VOCAB, support.SEQ), "dense")
    assert type(dense.output_layer).__name__ == "DenseOutputLayer"


def test_the_probe_takes_a_nonlinear_head_through_the_general_path_and_refuses_an_incomplete_one():
    model = mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ, head="sigsoftmax")
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1)).watch(model)
    assert probe._head is model.output_layer and probe._strategy.kind == "general"
    probe.remove()
    message = error_of(lambda: mb.base.head_view(model.output_layer))  # the closed form's view: none
    assert message.startswith("HeadConfigError: the linear probe's view") and "log_prob_fn" in message \
        and "\n" not in message
    idle = mb.GradientProbe(mb.ProbeConfig(interval=0)).watch(model)  # nothing due: idle
    assert idle._head is None

    class NoLogProb(type(model.output_layer)):
        log_prob_fn = None

    model.output_layer.__class__ = NoLogProb
    message = error_of(lambda: mb.GradientProbe(mb.ProbeConfig(interval=1)).watch(model))
    assert message.startswith("HeadConfigError: the gradient probe cannot measure the NoLogProb head") \
        and "log_prob_fn" in message and "\n" not in message
    assert mb.base.is_nonlinear_head(model.output_layer) and not mb.base.is_linear_head(model.output_layer)
    assert mb.base.is_linear_head(mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ,
                                                     head_rank=4).output_layer)


@pytest.mark.parametrize("model,pattern", [
    ({"head_type": "mo"}, r"model.head_type / model.head_options: unknown head kind 'mo'"),
    ({"head_type": "mos", "head_options": {"kk": 2}}, r"head kind 'mos' has no option 'kk'"),
    ({"head_type": "mos", "head_rank": 4}, r"model.head_rank=4 is the low-rank head's rank, but model.head_type=mos"),
    ({"head_type": "low_rank", "head_options": {"r": 64}}, r"model.head_options.r must be in \[1, model.hidden_size"),
    ({"head_type": "stacked", "head_options": {"width": 8}}, r"model.head_options.width must be >= model.hidden_size"),
    ({"head_type": "mos", "head_options": [2]}, r"model.head_options must be a mapping"),
    ({"head_type": "mos", "fused_loss": True, "head_fp8": "e4m3"}, r"model.head_fp8 is for the dense and low-rank"),
])
def test_trainer_config_errors_are_one_line(model, pattern):
    from megatron_bottleneck.train import TrainConfig

    message = error_of(lambda: TrainConfig.from_dict({"model": model}).validate())
    assert message.startswith("ConfigError: ") and "\n" not in message and re.search(pattern, message), message


def test_trainer_config_head():
    from megatron_bottleneck.train import TrainConfig

    cfg = TrainConfig.from_dict({"model": {"head_type": "mos", "head_options": {"k": 2}}, "train": {"seed": 3}})
    cfg.validate()
    assert str(cfg.head_config()) == "mos:k=2" and cfg.head_config().seed == 3
    rank = TrainConfig.from_dict({"model": {"head_rank": 8, "head_init": "orthogonal"}}).head_config()
    assert (rank.kind, rank.options) == ("low_rank", {"r": 8, "init": "orthogonal"})


@pytest.mark.parametrize("argv,pattern", [
    (["--lm-head-type", "moss"], r"--lm-head-type moss --lm-head-options '': unknown head kind 'moss'"),
    (["--lm-head-type", "mos", "--lm-head-options", "q=1"], r"head kind 'mos' has no option 'q'"),
    (["--lm-head-type", "mos", "--lm-head-options", "k"], r"--lm-head-options: option 'k' is not name=value"),
    (["--lm-head-options", "k=2"], r"--lm-head-options needs --lm-head-type"),
    (["--lm-head-type", "mos", "--lm-head-rank", "4"], r"--lm-head-rank is the low-rank head's rank"),
    (["--lm-head-type", "mos"], r"tied to the input embedding: add --untie-embeddings-and-output-weights"),
])
def test_megatron_lm_head_flags_are_checked_in_one_line(argv, pattern):
    from megatron_bottleneck.integrations.megatron_lm import check_arguments

    untie = [] if "tied" in pattern else ["--untie-embeddings-and-output-weights"]
    message = error_of(lambda: check_arguments(argv + untie))
    assert message.startswith("HeadConfigError: ") and "\n" not in message and re.search(pattern, message), message


def test_megatron_lm_head_flags_summary_line():
    from megatron_bottleneck.integrations.megatron_lm import check_arguments

    line = check_arguments(["--lm-head-type", "mos", "--lm-head-options", "k=4", "--untie-embeddings-and-output-weights"])
    assert line[-1].startswith("head: mos:k=4; loss:")


@pytest.mark.parametrize("kind", support_heads.KINDS)
def test_unfused_forward_through_megatron_cross_entropy_equals_the_head_loss(kind):
    # Megatron's vocab_parallel_cross_entropy edits the logits it gets in place: the head must survive it.
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    h, y, _, _ = support_heads._inputs()
    y = y.clamp(min=0)
    grads = []
    for path in ("megatron", "head"):
        head = support_heads.build(kind, 1, False)
        x = h.clone().requires_grad_(True)
        if path == "megatron":
            loss = vocab_parallel_cross_entropy(head(x)[0], y)
        else:
            loss = head.loss(x, y)
        loss.sum().backward()
        grads.append([loss.detach(), x.grad] + [p.grad for p in head.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_megatron_lm_installs_the_head_from_its_flags():
    import argparse

    from megatron_bottleneck.integrations.megatron_lm import check_arguments, install_head_from_args

    models = [mb.build_gpt_model(support.config(), support.VOCAB, support.SEQ) for _ in range(2)]
    args = argparse.Namespace(lm_head_type="mos", lm_head_options="k=3,fused=false", lm_head_rank=None,
                              lm_head_init="balanced", lm_head_fused_loss=True, seed=3)
    install_head_from_args(models, args)
    assert [(type(m.output_layer).__name__, m.output_layer.k, m.output_layer.fused) for m in models] == [
        ("MixtureOfSoftmaxesHead", 3, False)] * 2
    assert all(mb.heads.is_fused(m) for m in models)
    low = check_arguments(["--lm-head-type", "low_rank", "--lm-head-options", "r=8", "--hidden-size", "64",
                           "--untie-embeddings-and-output-weights"])
    assert low[-1].startswith("head: low-rank rank 8")
    assert "1 <= r <= the hidden size 64" in error_of(lambda: check_arguments(
        ["--lm-head-type", "low_rank", "--lm-head-options", "r=65", "--hidden-size", "64",
         "--untie-embeddings-and-output-weights"]))


@pytest.mark.parametrize("kind", support_heads.KINDS)
def test_bf16_loss_of_every_head_against_float64_beside_the_dense_head(kind):
    """What users run: the head in bf16 on peaked logits and Zipfian labels, its per-token loss against the float64
    reference on the same (bf16-rounded) parameters and inputs; the error stays within a small multiple of the
    dense bf16 head's (h W^T in bf16, float32 cross-entropy: today's path) on the same tokens."""
    D, V = support_heads.D, support_heads.V_REAL
    head = support_heads.build(kind, 1, False)
    with torch.no_grad():
        head.weight.mul_(6.0)  # peaked logits
    head = head.to(torch.bfloat16)
    p64 = {n: q.detach().double() for n, q in head.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    s, b = 16, 4
    h = (torch.randn(s, b, D, generator=gen) * 2).bfloat16()
    y = torch.multinomial(1.0 / torch.arange(1, V + 1, dtype=torch.float64), s * b, replacement=True,
                          generator=gen).reshape(s, b)
    got = head.loss(h, y).double().reshape(-1)
    u = support_heads.reference_log_probs(kind, p64, h.double().reshape(-1, D))
    want = -u.gather(1, y.reshape(-1, 1)).squeeze(1)
    err = float((got - want).abs().mean())
    w = p64["weight"][:V, :D]  # the dense head of the same scale (a stacked head's W is V x D')
    z16 = (h.reshape(-1, D) @ w.bfloat16().t()).float()
    dense = torch.nn.functional.cross_entropy(z16, y.reshape(-1), reduction="none").double()
    dense_want = torch.nn.functional.cross_entropy(h.double().reshape(-1, D) @ w.t(), y.reshape(-1), reduction="none")
    dense_err = float((dense - dense_want).abs().mean())
    assert torch.isfinite(got).all()
    assert err <= 4 * dense_err + 1e-3, (kind, err, dense_err)
