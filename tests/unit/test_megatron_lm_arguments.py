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
