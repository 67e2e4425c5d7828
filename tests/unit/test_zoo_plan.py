"""The zoo benchmark's parts that need no training: the analytic head cost against the parameters of each
built head, the --heads list, the one-line refusals of bad input (before any data or process), and the
unfused training path of the non-linear heads the zoo found broken (Megatron's cross-entropy of an unpadded u)."""
import pytest
import yaml

from megatron_bottleneck.cli import main
from megatron_bottleneck.heads import HeadConfig
from megatron_bottleneck.heads.cost import head_cost
from megatron_bottleneck.zoo import head_slug, load_zoo, split_heads
from tests import support_heads

BASE = {"model": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8},
        "train": {"train_steps": 2, "global_batch_size": 8, "micro_batch_size": 8},
        "logging": {"tensorboard": False, "console": False}}


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", ["dense", "low_rank:r=3"] + support_heads.KINDS)
def test_analytic_params_equal_the_built_heads_parameter_count(kind):
    module = support_heads.build(kind, 1, False)
    counted = sum(p.numel() for p in module.parameters())
    cost = head_cost(HeadConfig.parse(kind), support_heads.D, support_heads.V_PAD)
    assert cost.params == counted
    assert cost.flops_per_token >= 2 * support_heads.V_PAD * min(support_heads.D, 3)


def test_flops_per_token_by_hand():
    d, v = 16, 1000
    assert head_cost(HeadConfig.parse("dense"), d, v).flops_per_token == 2 * v * d
    assert head_cost(HeadConfig.parse("mos:k=4"), d, v).flops_per_token == 4 * (2 * d * d + 2 * d + 2 * v * d)
    assert head_cost(HeadConfig.parse("stacked:width=32"), d, v).flops_per_token == 2 * 32 * d + 2 * v * 32
    assert head_cost(HeadConfig.parse("low_rank:r=4"), d, v).flops_per_token == 2 * 4 * (d + v)


def test_split_heads_keeps_options_with_their_head():
    assert split_heads("dense, low_rank:r=8,init=orthogonal,mos:k=4,sigsoftmax") == [
        "dense", "low_rank:r=8,init=orthogonal", "mos:k=4", "sigsoftmax"]
    assert head_slug(HeadConfig.parse("low_rank:r=8,init=orthogonal")) == "low_rank_r8_initorthogonal"


def test_zoo_plan_expands_settings_by_heads(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "zoo": {"vd_ratios": [2, 4], "text_files": ["x.txt"],
                                                     "text_vocab_size": 48}}))
    plan = load_zoo(str(path), ["zoo.vd_ratios=[4]"], heads="dense,mos:k=2")
    assert [(r["setting"], r["vocab_size"], r["head"]) for r in plan.expand()] == [
        ("spamlang_V32", 32, "dense"), ("spamlang_V32", 32, "mos:k=2"), ("text_V48", 48, "dense"),
        ("text_V48", 48, "mos:k=2")]


def test_auto_options_match_the_dense_heads_parameters_per_setting(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "zoo": {"vd_ratios": [2, 16]}}))
    plan = load_zoo(str(path), heads="dense,stacked:width=auto,activation=tanh,low_rank:r=auto,mos:k=auto")
    d = 8
    got = {(r["vocab_size"], r["head_spec"]): r["head"] for r in plan.expand()}
    for v in (16, 128):
        # by hand: the closest parameter count to V D among the values the trainer accepts
        width = min(range(d, 65 * d), key=lambda w: (abs(v * w + w * d - v * d), w))
        rank = min(range(1, d + 1), key=lambda r: (abs(r * (v + d) - v * d), r))
        assert got[(v, "stacked:width=auto,activation=tanh")] == f"stacked:width={width},activation=tanh"
        assert got[(v, "low_rank:r=auto")] == f"low_rank:r={rank}"
        assert got[(v, "mos:k=auto")] == "mos:k=1"  # K D^2 + K D on top of V D: the fewest components
        assert got[(v, "dense")] == "dense"
    assert got[(16, "low_rank:r=auto")] == "low_rank:r=5" and got[(128, "stacked:width=auto,activation=tanh")] == \
        "stacked:width=8,activation=tanh"
    names = [r["name"] for r in plan.expand()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("heads, words", [
    ("dense,nosuch", ["nosuch"]),
    ("mos:kk=4", ["kk"]),
    ("mos:k=zero", ["k"]),
    ("low_rank:r=64", ["r", "hidden_size=8"]),
    ("dense,dense", ["twice"]),
    ("mos:k=auto,proj_std=auto", ["one option can be auto"]),
])
def test_bad_heads_are_one_line(tmp_path, capsys, heads, words):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["zoo", str(path), "--heads", heads, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_unknown_zoo_key_is_one_line(tmp_path, capsys):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "zoo": {"ratios": [4]}}))
    assert main(["zoo", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zoo.ratios" in err[0] and "vd_ratios" in err[0]


@pytest.mark.usefixtures("megatron_one_rank")
@pytest.mark.parametrize("kind", ["mos:k=2", "sigsoftmax", "stacked:width=12"])
def test_megatrons_cross_entropy_of_an_unpadded_nonlinear_head_backpropagates(kind):
    """The trainer's unfused path (model.fused_loss=false): Megatron's vocab_parallel_cross_entropy of the head's
    u = log p, with no vocabulary padding (u is then the log-softmax output its backward saved; Megatron's
    cross-entropy changes its input in place). Gradients equal those of the head's own loss."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_bottleneck.base.head import HeadBuildContext, check_head

    head = HeadConfig.parse(kind)
    ctx = HeadBuildContext(hidden_size=8, vocab_size=64, real_vocab_size=64, seed=3,
                           config=support_heads.head_config(1, False))
    module = check_head(head.spec().builder(ctx, head.resolved_options()), head.kind)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 64, (4, 2), generator=gen)
    u, _ = module(h)
    vocab_parallel_cross_entropy(u, labels).sum().backward()
    got = h.grad.clone()
    h.grad = None
    module.loss(h, labels).sum().backward()
    torch.testing.assert_close(got, h.grad, rtol=1e-5, atol=1e-7)
