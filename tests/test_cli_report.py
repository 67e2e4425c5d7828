"""SpamLang data, the CLI (spamlang / sweep / probe / report / errors) on a real short sweep."""
import json
import os

import numpy as np
import pytest
import yaml

from megatron_bottleneck.cli import main
from megatron_bottleneck.data import IndexedSequences, SpamLangConfig, coverage, draw_symbols, generate_spamlang
from megatron_bottleneck.errors import ConfigError
from megatron_bottleneck.report import load_runs


def test_spamlang_reads_back_exactly_and_is_deterministic(tmp_path):
    cfg = SpamLangConfig(vocab_size=50, seq_length=12, num_sequences=400, seed=7, valid_fraction=0.1)
    meta = generate_spamlang(cfg, str(tmp_path / "a"))
    symbols = draw_symbols(cfg)
    train = IndexedSequences(meta["train_prefix"])
    valid = IndexedSequences(meta["valid_prefix"])
    assert len(train) == 360 and len(valid) == 40 and train.doc_length == 13
    for i in (0, 17, 359):
        assert (train[i] == symbols[i]).all()
    assert (valid[39] == symbols[-1]).all()
    assert symbols.min() >= 1  # id 0 (EOD) is never a symbol
    counts = np.bincount(symbols[:360], minlength=50)[1:]
    assert meta["coverage_sequences"] == {"min": int(counts.min()), "median": float(np.median(counts)),
                                          "max": int(counts.max()), "never_drawn": int((counts == 0).sum()),
                                          "symbols": 49}
    again = generate_spamlang(cfg, str(tmp_path / "b"))
    assert open(again["train_prefix"] + ".bin", "rb").read() == open(meta["train_prefix"] + ".bin", "rb").read()
    other = draw_symbols(SpamLangConfig(50, 12, 400, seed=8))
    assert (other != symbols).any()


def test_megatron_gptdataset_reads_back_the_generated_sequences(tmp_path):
    from megatron_bottleneck.data import spamlang_gpt_dataset

    cfg = SpamLangConfig(vocab_size=50, seq_length=12, num_sequences=400, seed=7, valid_fraction=0.1)
    meta = generate_spamlang(cfg, str(tmp_path / "a"))
    ds = spamlang_gpt_dataset(meta["train_prefix"], 50, 12, str(tmp_path / "cache"))
    samples = [ds[i]["tokens"].numpy() for i in range(len(ds))]
    assert len(samples) == 360 and all(s.shape == (13,) and (s == s[0]).all() for s in samples)
    assert sorted(int(s[0]) for s in samples) == sorted(draw_symbols(cfg)[:360].tolist())


def test_zipf_is_skewed_and_bad_input_is_refused():
    z = draw_symbols(SpamLangConfig(100, 4, 20000, distribution="zipf", zipf_exponent=1.2, seed=0))
    c = np.bincount(z, minlength=100)
    assert c[1] > 10 * c[50]
    with pytest.raises(ConfigError, match="fewer than 2 symbols"):
        draw_symbols(SpamLangConfig(2, 4, 10))
    with pytest.raises(ConfigError, match="distribution must be"):
        draw_symbols(SpamLangConfig(10, 4, 10, distribution="normal"))
    with pytest.raises(FileNotFoundError, match="no indexed dataset"):
        IndexedSequences("/nonexistent/prefix")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = {"model": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8, "vocab_size": 64},
           "train": {"train_steps": 16, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 4,
                     "log_interval": 8},
           "optim": {"lr": 0.02, "warmup_steps": 2},
           "checkpoint": {"save_interval": 8},
           "logging": {"tensorboard": False, "console": False},
           "probe": {"interval": 2, "rank_interval": 8, "rank_token_budget": 128}}
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    assert main(["sweep", str(path), "--vocab-sizes", "64", "--head-ranks", "dense,2", "--lrs", "0.02",
                 "--workers", "2", "--out", str(out)]) == 0
    return tmp, out


def test_sweep_runs_and_report(sweep):
    tmp, out = sweep
    runs = load_runs(str(out))
    assert sorted(r.name for r in runs) == ["runs/V64_dense_lr0.02", "runs/V64_r2_lr0.02"]
    for r in runs:
        assert os.path.exists(os.path.join(r.path, "DONE"))
        assert [m["step"] for m in r.metrics] == list(range(1, 17))
        assert r.params["coverage"]["median"] > 0
    report = open(out / "report.md").read()
    assert "loss_by_vocab.png" in report and "destroyed_vs_vd.png" in report
    for png in ("loss_by_vocab.png", "destroyed_vs_vd.png", "rank_vs_tokens.png"):
        assert (out / png).stat().st_size > 1000
    dense = next(r for r in runs if r.params["head_rank"] is None)
    assert f"{dense.final('valid_loss'):.3f}" in report
    rank2 = next(r for r in runs if r.params["head_rank"] == 2)
    assert rank2.mean_probe("destroyed_ratio") > dense.mean_probe("destroyed_ratio")
    # A finished sweep is skipped when run again.
    assert main(["report", str(out)]) == 0


def test_probe_command_on_a_checkpoint(sweep, capsys):
    tmp, out = sweep
    ckpt = out / "runs" / "V64_dense_lr0.02" / "ckpt"
    assert main(["probe", str(ckpt), "--data", str(out / "data" / "V64_valid"), "--batches", "2",
                 "--out", str(tmp / "fig.json")]) == 0
    fig = json.load(open(tmp / "fig.json"))
    assert 0 < fig["destroyed_ratio"] < 1 and fig["numerical_rank"] >= 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 0.1}\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in capsys.readouterr().err
    assert main(["probe", str(tmp_path), "--data", "x"]) == 2
