"""SpamLang data: exact read-back (our reader and Megatron's GPTDataset), determinism, bad input."""
import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bottleneck.base.errors import ConfigError
from megatron_bottleneck.data import (IdTokenizer, SpamLangConfig, batches, build_gpt_datasets, draw_symbols,
                                      generate_spamlang, spamlang_sequence_tokens)


def test_spamlang_reads_back_exactly_and_is_deterministic(tmp_path):
    cfg = SpamLangConfig(vocab_size=50, seq_length=12, num_sequences=400, seed=7, valid_fraction=0.1)
    meta = generate_spamlang(cfg, str(tmp_path / "a"))
    symbols = draw_symbols(cfg)
    train = IndexedDataset(meta["train_prefix"])
    valid = IndexedDataset(meta["valid_prefix"])
    assert len(train) == 360 and len(valid) == 40 and set(train.sequence_lengths) == {13}
    assert spamlang_sequence_tokens(meta["train_prefix"]) == 13 and spamlang_sequence_tokens("/x/corpus") is None
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
    """Through megatron-core's GPTDataset, one whole sequence per sample: inputs and shifted labels."""
    cfg = SpamLangConfig(vocab_size=50, seq_length=12, num_sequences=400, seed=7, valid_fraction=0.1)
    meta = generate_spamlang(cfg, str(tmp_path / "a"))
    train, valid, _ = build_gpt_datasets(meta["train_prefix"], meta["valid_prefix"], seq_length=12, vocab_size=50,
                                         cache_dir=str(tmp_path / "cache"), tokenizer=IdTokenizer(50, 0, 0),
                                         document_aligned=True)
    assert len(train) == 360 and len(valid) == 40
    stream = batches(train, 360, 360, document_aligned=True)
    batch = next(stream)
    tokens, labels = batch["tokens"].numpy(), batch["labels"].numpy()
    assert tokens.shape == labels.shape == (360, 12) and (tokens == labels).all() and batch["loss_mask"].all()
    assert all((row == row[0]).all() for row in tokens)
    assert sorted(int(row[0]) for row in tokens) == sorted(draw_symbols(cfg)[:360].tolist())


def test_zipf_is_skewed_and_bad_input_is_refused():
    z = draw_symbols(SpamLangConfig(100, 4, 20000, distribution="zipf", zipf_exponent=1.2, seed=0))
    c = np.bincount(z, minlength=100)
    assert c[1] > 10 * c[50]
    with pytest.raises(ConfigError, match="fewer than 2 symbols"):
        draw_symbols(SpamLangConfig(2, 4, 10))
    with pytest.raises(ConfigError, match="distribution must be"):
        draw_symbols(SpamLangConfig(10, 4, 10, distribution="normal"))
