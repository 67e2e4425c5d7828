"""The head and probe flags of the Megatron-LM runner, checked before Megatron-LM parses its arguments."""
import pytest

from megatron_bottleneck.base.errors import HeadConfigError
from megatron_bottleneck.integrations.megatron_lm import check_arguments

BASE = ["--hidden-size", "64", "--train-iters", "10", "--global-batch-size", "4", "--seq-length", "32",
        "--untie-embeddings-and-output-weights"]


@pytest.mark.parametrize("flags, message", [
    (["--lm-head-rank", "0"], "--lm-head-rank must be >= 1, got 0: omit it to keep Megatron's dense head"),
    (["--lm-head-rank", "-3"], "--lm-head-rank must be >= 1, got -3"),
    (["--lm-head-rank", "x"], "--lm-head-rank takes an integer, got 'x'"),
    (["--lm-head-rank", "65"], "--lm-head-rank 65 exceeds the hidden size 64 (--hidden-size)"),
    (["--lm-head-init", "svd"], "--lm-head-init 'svd' is not an initialisation of the low-rank head: use one of "
                                "balanced, orthogonal, from_dense"),
    (["--lm-head-fused-loss", "--cross-entropy-loss-fusion"], "--lm-head-fused-loss computes the cross-entropy "
                                                              "inside the head, and --cross-entropy-loss-fusion"),
    (["--probe-interval", "-1"], "--probe-interval must be >= 0, got -1"),
    (["--probe-rank-interval", "5", "--probe-rank-token-budget", "1"], "--probe-rank-token-budget must be >= 2"),
    (["--probe-interval", "1", "--probe-general-iterations", "0"], "--probe-general-iterations must be >= 1, got 0"),
    (["--lm-head-softcap", "30"], "--lm-head-softcap is an option of the fused head loss: add --lm-head-fused-loss"),
    (["--lm-head-fused-loss", "--lm-head-softcap", "0"], "--lm-head-softcap must be > 0, got 0"),
    (["--lm-head-fused-loss", "--lm-head-z-loss-weight", "x"], "--lm-head-z-loss-weight takes a number, got 'x'"),
    (["--lm-head-fused-loss", "--lm-head-z-loss-weight", "-1"], "--lm-head-z-loss-weight must be >= 0, got -1"),
    (["--lm-head-label-smoothing", "0.1"], "--lm-head-label-smoothing is an option of the fused head loss"),
    (["--lm-head-fused-loss", "--lm-head-label-smoothing", "1"], "--lm-head-label-smoothing must be in [0, 1), got 1"),
    (["--lm-head-fused-loss", "--lm-head-smoothing-convention", "liger"], "--lm-head-smoothing-convention 'liger': "
                                                                           "use megatron"),
    (["--lm-head-class-weights", "/nonexistent/w.txt"], "--lm-head-class-weights is an option of the fused head"),
    (["--lm-head-fused-loss", "--lm-head-class-weights", "/nonexistent/w.txt"],
     "--lm-head-class-weights /nonexistent/w.txt: no such file"),
])
def test_a_bad_flag_is_one_line(flags, message):
    with pytest.raises(HeadConfigError) as e:
        check_arguments(BASE + flags)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_fused_loss_options_reach_the_fused_loss_config():
    from megatron_bottleneck.integrations.megatron_lm import _fused_loss_config, _option_parser

    args, _ = _option_parser().parse_known_args(BASE + ["--lm-head-fused-loss", "--lm-head-softcap", "30",
                                                        "--lm-head-z-loss-weight", "1e-4"])
    cfg = _fused_loss_config(args)
    assert (cfg.softcap, cfg.z_loss_weight) == (30.0, 1e-4)
    assert check_arguments(BASE + ["--lm-head-fused-loss", "--lm-head-softcap", "30"])[-1].startswith("head: ")


def test_class_weights_and_smoothing_flags_reach_the_fused_loss_config(tmp_path):
    """--lm-head-class-weights reads a text file or a torch.save'd 1-D tensor (a bad one is one line);
    --lm-head-label-smoothing / --lm-head-smoothing-convention land in FusedLossConfig, whose LossSpec gives
    Megatron's eps = alpha V / (V - 1) or torch's alpha."""
    import torch

    from megatron_bottleneck.integrations.megatron_lm import _fused_loss_config, _option_parser

    text, pt, bad = tmp_path / "w.txt", tmp_path / "w.pt", tmp_path / "bad.txt"
    text.write_text("1 0.5\n2 0\n")
    torch.save(torch.tensor([1.0, 0.5, 2.0, 0.0]), pt)
    bad.write_text("1 -2 3")
    for path in (text, pt):
        args, _ = _option_parser().parse_known_args(BASE + [
            "--lm-head-fused-loss", "--lm-head-class-weights", str(path), "--lm-head-label-smoothing", "0.1",
            "--lm-head-smoothing-convention", "torch"])
        cfg = _fused_loss_config(args)
        assert cfg.ce_weight == (1.0, 0.5, 2.0, 0.0) and cfg.label_smoothing == 0.1
        assert cfg.loss_spec().smoothing(11) == pytest.approx(0.1)
    args.lm_head_smoothing_convention = "megatron"
    assert _fused_loss_config(args).loss_spec().smoothing(11) == pytest.approx(0.11)
    with pytest.raises(HeadConfigError) as e:
        check_arguments(BASE + ["--lm-head-fused-loss", "--lm-head-class-weights", str(bad)])
    assert str(e.value).endswith("class weights must be at least 2 finite numbers >= 0 (one per class)")


def test_tied_embeddings_with_a_low_rank_head_are_refused():
    with pytest.raises(HeadConfigError, match="add --untie-embeddings-and-output-weights"):
        check_arguments(["--hidden-size", "64", "--lm-head-rank", "8"])


def test_a_rank_budget_the_run_cannot_fill_is_a_warning(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # DP=2: each rank's head sees half the tokens
    lines = check_arguments(BASE + ["--lm-head-rank", "8", "--probe-rank-interval", "5",
                                    "--probe-rank-token-budget", "1000"])
    assert lines[0] == ("--probe-rank-token-budget 1000 exceeds the 640 tokens one data-parallel rank sees in this "
                        "run (10 iterations x 2 sequences x 32 tokens): the rank figures will never be reported; "
                        "lower the budget to <= 640")
    assert len(check_arguments(BASE + ["--probe-rank-interval", "5", "--probe-rank-token-budget", "640"])) == 1


def test_the_active_head_loss_and_probe_are_one_line():
    assert check_arguments(BASE) == ["head: Megatron's dense output layer; loss: Megatron's cross-entropy; probe: off"]
    line, = check_arguments(BASE + ["--lm-head-rank", "16", "--lm-head-fused-loss", "--probe-interval", "10",
                                    "--probe-log-dir", "runs/p"])
    assert line == ("head: low-rank rank 16 (init balanced); loss: fused with the head (no [s, b, V/tp] logits); "
                    "probe: interval 10, update_interval 0, rank_interval 0 (budget 2048 tokens), log dir runs/p")
    assert "loss: Megatron's fused cross-entropy" in check_arguments(BASE + ["--cross-entropy-loss-fusion"])[0]


HYBRID = BASE + ["--hybrid-layer-pattern"]
LOCAL = ["--spec", "megatron_bottleneck.models.hybrid", "LOCAL_HYBRID_STACK_SPEC"]
TE = ["--spec", "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]


@pytest.mark.parametrize("flags, cpu, message", [
    (["M*-*-"], True, "--hybrid-layer-pattern 'M*-*-': megatron-bottleneck's local hybrid spec, the CPU mode's "
                      "default, builds attention '*' and MLP '-' layers, not 'M'; Mamba 'M' layers need Mamba's CUDA "
                      "kernels and Transformer Engine: on GPUs use --spec megatron.core.models.hybrid"),
    (["*E*-", *LOCAL], False, "--hybrid-layer-pattern '*E*-': --spec megatron_bottleneck.models.hybrid "
                              "LOCAL_HYBRID_STACK_SPEC builds attention '*' and MLP '-' layers, not 'E': use --spec "
                              "megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec"),
    (["*-*-/*-"], True, "--hybrid-layer-pattern '*-*-/*-' declares multi-token prediction ('/')"),
    (["*-*-", *TE], True, "--spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec is Megatron's "
                          "Transformer Engine hybrid stack, which does not run in CPU mode: omit --spec"),
])
def test_a_hybrid_pattern_the_spec_does_not_build_is_one_line(flags, cpu, message):
    from megatron_bottleneck.base.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_arguments(HYBRID + flags, cpu=cpu)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_hybrid_patterns_the_spec_builds_pass():
    """Attention / MLP with pipeline stages under the local spec (CPU default or --spec), anything under Megatron's
    own spec on GPUs: the usual status line only."""
    for flags, cpu in ((["*-|*-"], True), (["*-*-", *LOCAL], False), (["M*M-/*-", *TE], False), (["M*M-"], False)):
        assert check_arguments(HYBRID + flags, cpu=cpu)[-1].startswith("head: Megatron's dense output layer")


def test_pretrain_hybrid_on_megatron_core_016_is_one_line(tmp_path, capsys):
    """Megatron-LM core_v0.16 has no pretrain_hybrid.py, megatron-core 0.16 no HybridModel: the runner says so in one
    line (exit 2) before anything runs; with megatron-core >= 0.19 the check passes."""
    from megatron_bottleneck.integrations.megatron_lm import _require_hybrid
    from tests.lanes import MEGATRON_CORE

    script = str(tmp_path / "pretrain_hybrid.py")
    if not MEGATRON_CORE.startswith("0.16."):
        _require_hybrid(script)
        return
    from megatron_bottleneck.integrations.megatron_lm import main

    with pytest.raises(SystemExit) as e:
        main([script, "--hybrid-layer-pattern", "*-*-"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"megatron-bottleneck: error: {script} builds Megatron-Core's HybridModel, which needs "
                             "megatron-core >= 0.19 and Megatron-LM core_v0.19 or later (installed megatron-core 0.16.1")
