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


# ------------------------------------------------------------------ learning-rate grid, seeds, significance
def test_a_learning_rate_grid_and_seeds_expand_into_runs_with_their_own_config(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({**BASE, "zoo": {"vd_ratios": [4], "lrs": [1e-2, 3e-2], "seeds": [1, 2, 3]}}))
    plan = load_zoo(str(path), heads="dense,low_rank:r=4")
    runs = plan.expand()
    assert len(runs) == 2 * 2 * 3 and len({r["name"] for r in runs}) == 12
    assert runs[0]["name"] == "spamlang_V32/dense__lr0.01_seed1" and runs[-1]["name"] == "spamlang_V32/low_rank_r4__lr0.03_seed3"
    assert {r["head_name"] for r in runs} == {"spamlang_V32/dense", "spamlang_V32/low_rank_r4"}  # one inspection per head
    cfg = plan.run_config(runs[-1], None, str(tmp_path / "r"), probe=False)
    assert cfg.optim.lr == 3e-2 and cfg.train.seed == 3
    # without a grid the names (and run directories) are those of earlier zoos
    one = load_zoo(str(path), ["zoo.lrs=[]", "zoo.seeds=[]"], heads="dense").expand()
    assert [r["name"] for r in one] == ["spamlang_V32/dense"] and one[0]["lr"] == plan.base.optim.lr


@pytest.mark.parametrize("override, words", [("zoo.lrs=[0.01,-1]", ["zoo.lrs", "-1"]),
                                             ("zoo.seeds=[1,1]", ["zoo.seeds", "twice"]),
                                             ("zoo.seeds=[1.5]", ["zoo.seeds", "1.5"])])
def test_bad_grids_are_one_line(tmp_path, capsys, override, words):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["zoo", str(path), "--heads", "dense", "--out", str(tmp_path / "out"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_welch_t_test_against_scipy_and_the_t_table():
    from megatron_bottleneck.zoo_report import welch_t_test

    # the t table: two-sided 5% at df = 4 is t = 2.776445; equal variances and sizes give df = 2 n - 2
    a, b = [0.0, 1.0, 2.0], [2.776445 * (2 / 3) ** 0.5 + x for x in (0.0, 1.0, 2.0)]
    got = welch_t_test(b, a)
    assert got["df"] == pytest.approx(4.0) and got["p"] == pytest.approx(0.05, abs=1e-6)
    assert welch_t_test([1.0], [1.0, 2.0]) is None
    assert welch_t_test([1.0, 1.0], [1.0, 1.0])["p"] == 1.0 and welch_t_test([1.0, 1.0], [2.0, 2.0])["p"] == 0.0
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    for n_a, n_b, shift in [(3, 3, 0.1), (3, 5, 1.0), (5, 4, 0.0), (2, 6, 3.0), (8, 8, 0.05)]:
        x = [rng.gauss(4.2, 0.05) for _ in range(n_a)]
        y = [rng.gauss(4.2 + shift * 0.05, 0.2) for _ in range(n_b)]
        ref = stats.ttest_ind(x, y, equal_var=False)
        got = welch_t_test(x, y)
        assert got["t"] == pytest.approx(ref.statistic, rel=1e-12) and got["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def _zoo_run(root, head, kind, lr, seed, valid):
    import json
    import os

    d = os.path.join(root, "runs", "spamlang_V32", f"{head}__lr{lr:g}_seed{seed}")
    os.makedirs(os.path.join(d, "logs"))
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"kind": "zoo", "setting": "spamlang_V32", "data": "spamlang", "vocab_size": 32, "hidden_size": 8,
                   "head": head, "head_kind": kind, "lr": lr, "seed": seed, "train_steps": 2, "tokens_per_step": 64,
                   "params": 256}, f)
    with open(os.path.join(d, "logs", "metrics.jsonl"), "w") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "tokens": 64 * step, "loss": valid + 1 / step,
                                "valid_loss": valid + (0.5 if step == 1 else 0.0)}) + "\n")


def test_the_report_takes_each_head_at_its_best_learning_rate_with_spread_and_welch_test(tmp_path):
    """Run directories as the zoo writes them, with final valid losses chosen so that the figures are known:
    dense is best at lr 0.01, low_rank at 0.03; low_rank's best is clearly worse than dense's, mos's is not
    separable from it. The report's table and zoo.json hold those figures (read back from the files)."""
    import json
    import statistics

    from megatron_bottleneck.zoo_report import write_zoo_report

    losses = {("dense", "dense", 0.01): [4.00, 4.02, 3.98], ("dense", "dense", 0.03): [4.10, 4.12, 4.08],
              ("low_rank:r=4", "low_rank", 0.01): [4.60, 4.62, 4.58], ("low_rank:r=4", "low_rank", 0.03): [4.50, 4.53, 4.47],
              ("mos:k=2", "mos", 0.01): [4.01, 3.95, 4.06], ("mos:k=2", "mos", 0.03): [4.30, 4.31, 4.29]}
    for (head, kind, lr), vals in losses.items():
        for seed, v in zip((1, 2, 3), vals):
            _zoo_run(str(tmp_path), head, kind, lr, seed, v)
    md = open(write_zoo_report(str(tmp_path))).read()
    table = {h["head"]: h for h in json.load(open(tmp_path / "zoo.json"))["settings"][0]["best_lr"]}
    assert table["dense"]["best_lr"] == 0.01 and table["low_rank:r=4"]["best_lr"] == 0.03
    assert table["low_rank:r=4"]["best"]["mean"] == pytest.approx(4.50)
    assert table["low_rank:r=4"]["best"]["std"] == pytest.approx(statistics.stdev([4.50, 4.53, 4.47]))
    assert table["low_rank:r=4"]["vs_dense"]["verdict"] == "worse than dense"
    assert table["low_rank:r=4"]["vs_dense"]["difference"] == pytest.approx(0.5)
    assert table["mos:k=2"]["vs_dense"]["verdict"] == "not separable" and table["mos:k=2"]["vs_dense"]["test"]["p"] > 0.05
    assert "| low_rank:r=4 | 4.600 | 4.500 | 0.03 | 4.500 +- 0.030 (3) | +0.5 |" in md, md
    assert "| dense | 4.000 | 4.100 | 0.01 |" in md and "(the reference)" in md and "seeds [1, 2, 3]" in md


@pytest.mark.usefixtures("megatron_one_rank")
def test_every_builtin_spec_holds_its_cost_and_the_probe_path_the_probe_takes():
    """One HeadSpec per kind: builder, options, analytic cost and the gradient probe's path; the path declared is
    the one GradientProbe takes on the built head (closed form: probe_view; general: log_prob_fn)."""
    import megatron_bottleneck as mb
    from megatron_bottleneck.base.head import HEADS

    for kind in ["dense", "low_rank:r=3"] + support_heads.KINDS:
        spec = HeadConfig.parse(kind).spec()
        assert spec is HEADS.get(spec.name) and spec.cost is not None and spec.probe in ("linear", "general")
        module = support_heads.build(kind, 1, False)
        probe = mb.GradientProbe(mb.ProbeConfig(interval=1, log_dir=None)).watch_head(module)
        assert probe._strategy.kind == spec.probe, kind
        probe.remove()


def test_a_registry_of_ones_own_keeps_its_kinds_apart():
    from megatron_bottleneck.base.errors import HeadConfigError
    from megatron_bottleneck.base.head import HEADS, HeadCost, HeadRegistry, register_head
    from megatron_bottleneck.heads.builtin import register_builtin_heads

    mine = HeadRegistry()
    register_builtin_heads(mine)
    register_head("wide", lambda ctx, o: None, cost=lambda o, d, v: HeadCost(3 * v * d, 6 * v * d), registry=mine)
    assert "wide" in mine and "wide" not in HEADS and mine.names()[:2] == ["dense", "low_rank"]
    assert head_cost(HeadConfig.parse("wide"), 8, 100, registry=mine) == HeadCost(2400, 4800)
    assert head_cost(HeadConfig.parse("mos:k=2"), 8, 100, registry=mine) == head_cost(HeadConfig.parse("mos:k=2"), 8, 100)
    with pytest.raises(HeadConfigError, match="unknown head kind 'wide'"):
        HeadConfig.parse("wide").spec()
    with pytest.raises(HeadConfigError, match="already registered"):
        register_head("wide", lambda ctx, o: None, registry=mine)
