"""SpamLang data: exact read-back (our reader and Megatron's GPTDataset), determinism, bad input."""
import numpy as np
import pytest

from megatron_bottleneck.base.errors import ConfigError, DataError
from megatron_bottleneck.data import IndexedSequences, SpamLangConfig, draw_symbols, generate_spamlang


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
    with pytest.raises(DataError, match="no indexed dataset"):
        IndexedSequences("/nonexistent/prefix")
