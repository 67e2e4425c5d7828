"""megatron_bottleneck.data.gpt_data: megatron-core's GPTDataset path (packing, blends, splits, mock), the
resumable batch iterator, and the one-line data errors raised before ranks start."""
import json
import os
import random

import numpy as np
import pytest
import torch

from megatron_bottleneck.data import SpamLangConfig, generate_spamlang
from megatron_bottleneck.data.gpt_data import (IdTokenizer, batches, build_gpt_datasets, max_token_id, parse_blend,
                                               validate_gpt_data, write_metadata)
from megatron_bottleneck.base.errors import DataError

WORDS = ("gradient bottleneck softmax vocabulary hidden rank head logit token model train learn "
         "the a of to and in is was for on with as by at from").split()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Two variable-length corpora written by our tokenize_to_indexed (SentencePiece, EOD = 1)."""
    pytest.importorskip("sentencepiece")
    from megatron_bottleneck.data.text import tokenize_to_indexed, train_tokenizer

    tmp = tmp_path_factory.mktemp("text")
    files = []
    for seed in (0, 1):
        rng = random.Random(seed)
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) + "." for _ in range(200)]
        f = tmp / f"c{seed}.txt"
        f.write_text("\n\n".join(paras) + "\n")
        files.append(str(f))
    model = train_tokenizer(files, 120, str(tmp / "tok" / "sp"))
    a = tokenize_to_indexed(files[:1], model, str(tmp / "a"))
    b = tokenize_to_indexed(files[1:], model, str(tmp / "b"))
    return {"a": a["prefix"], "b": b["prefix"], "vocab": a["vocab_size"], "tmp": str(tmp)}


def _flat(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]  # copies: the mmap closes with ds


def test_variable_length_documents_are_packed(text, tmp_path):
    docs = _flat(text["a"])
    assert len({len(d) for d in docs}) > 5  # variable lengths
    cache = str(tmp_path / "run" / "data_cache")
    train, valid, test = build_gpt_datasets(text["a"], seq_length=16, vocab_size=text["vocab"], seed=7,
                                            split="90,10,0", cache_dir=cache, num_samples=(64, 8, None))
    assert test is None and len(train) >= 64 and len(valid) >= 8
    assert os.listdir(cache)  # megatron's index cache lives in the run dir
    # the train split has the first 90% of the documents, valid the rest
    assert train.indices.min() == 0 and train.indices.max() == 179
    assert valid.indices.min() == 180 and valid.indices.max() == 199
    s = train[0]
    assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (16,)
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])
    stream = np.concatenate(docs)
    joined = torch.cat([train[i]["tokens"] for i in range(64)])
    assert (joined == 1).any()  # EOD inside samples: documents are packed across sample boundaries
    # every sample is a window of the concatenation of (shuffled) documents: all its tokens occur in the corpus
    assert set(joined.tolist()) <= set(stream.tolist())
    again = build_gpt_datasets(text["a"], seq_length=16, vocab_size=text["vocab"], seed=7, split="90,10,0",
                               cache_dir=cache, num_samples=(64, 8, None))[0]
    other = build_gpt_datasets(text["a"], seq_length=16, vocab_size=text["vocab"], seed=8, split="90,10,0",
                               cache_dir=cache, num_samples=(64, 8, None))[0]
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(10))
    assert not all(torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(10))


def test_batches_are_deterministic_resumable_and_split_over_dp(text, tmp_path):
    train = build_gpt_datasets(text["a"], seq_length=16, vocab_size=text["vocab"], split="90,10,0",
                               cache_dir=str(tmp_path), num_samples=(100, 8, None))[0]
    it = batches(train, 8, 4)
    first = [next(it) for _ in range(6)]
    b = first[0]
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (4, 16)
    assert b["tokens"].dtype == b["labels"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["position_ids"][0], torch.arange(16))
    resumed = batches(train, 8, 4, consumed=16)  # after two global batches of 8
    assert all(torch.equal(next(resumed)["tokens"], first[k]["tokens"]) for k in (4, 5))
    r0, r1 = batches(train, 8, 4, dp_rank=0, dp_size=2), batches(train, 8, 4, dp_rank=1, dp_size=2)
    for step in range(2):
        both = torch.cat([next(r0)["tokens"], next(r1)["tokens"]])
        assert torch.equal(both, torch.cat([first[2 * step]["tokens"], first[2 * step + 1]["tokens"]]))
    wrap = batches(train, 8, 4, consumed=len(train) - 4)  # runs past the end: wraps to the start
    assert torch.equal(next(wrap)["tokens"], torch.stack([train[i]["tokens"] for i in range(len(train) - 4, len(train))]))
    assert torch.equal(next(wrap)["tokens"], first[0]["tokens"])


def test_spamlang_reads_through_it_with_a_blend_per_split(tmp_path):
    meta = generate_spamlang(SpamLangConfig(64, 8, 200, seed=1), str(tmp_path / "spam"))
    train, valid, test = build_gpt_datasets(meta["train_prefix"], meta["valid_prefix"], seq_length=8,
                                            vocab_size=64, tokenizer=IdTokenizer(64, eod=0, pad=0),
                                            cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) > 0 and len(valid) > 0
    s = train[0]
    assert s["tokens"].shape == (8,) and int(s["tokens"].min()) >= 1 and int(s["tokens"].max()) < 64
    symbols = {int(train[i]["tokens"][0]) for i in range(len(train))}
    assert len(symbols) > 20
    assert max_token_id(meta["train_prefix"]) == 63  # from SpamLang's metadata (upper bound)


def test_weighted_blend_as_megatron_lm_writes_it(text, tmp_path):
    blend = f"0.7 {text['a']} 0.3 {text['b']}"
    assert parse_blend(blend) == ([text["a"], text["b"]], [0.7, 0.3])
    assert parse_blend(blend.split()) == parse_blend(blend)
    assert parse_blend(f"{text['a']} {text['b']}") == ([text["a"], text["b"]], None)
    train, valid, _ = build_gpt_datasets(blend, seq_length=16, vocab_size=text["vocab"], split="90,10,0",
                                         cache_dir=str(tmp_path), num_samples=(400, 40, None))
    from megatron.core.datasets.blended_dataset import BlendedDataset

    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 40
    share = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert share[0] == pytest.approx(0.7, abs=0.02) and share[1] == pytest.approx(0.3, abs=0.02)
    with pytest.raises(DataError, match="weighted blend needs num_samples for the train"):
        build_gpt_datasets(blend, seq_length=16, vocab_size=text["vocab"], split="90,10,0", cache_dir=str(tmp_path))


def test_mock_data(tmp_path):
    train, valid, test = build_gpt_datasets(mock=True, seq_length=256, vocab_size=100, cache_dir=str(tmp_path),
                                            tokenizer=IdTokenizer(100, eod=0, pad=-1), num_samples=(20, 5, 5))
    assert len(train) >= 20 and len(valid) >= 5 and len(test) >= 5  # whole epochs of megatron's mock documents
    b = next(batches(train, 4, 2))
    assert b["tokens"].shape == (2, 256) and int(b["tokens"].max()) < 100


def test_errors_are_one_line_and_name_the_fix(text, tmp_path):
    def error(**kw):
        with pytest.raises(DataError) as e:
            kw.setdefault("seq_length", 16)
            kw.setdefault("cache_dir", str(tmp_path))
            build_gpt_datasets(**kw)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    msg = error(train=str(tmp_path / "nope"), vocab_size=128)
    assert "no indexed dataset at" in msg and "nope.bin and" in msg and "tokenize_to_indexed" in msg
    msg = error(train=f"0.5 {text['a']} 0.5 {tmp_path}/missing", vocab_size=128, split="90,10,0",
                num_samples=(10, 1, None))
    assert "missing.bin" in msg
    top = max_token_id(text["a"])  # memmap scan
    assert top == max(int(d.max()) for d in _flat(text["a"]))
    msg = error(train=text["a"], vocab_size=top)
    assert f"has token id {top}" in msg and f"set model.vocab_size >= {top + 1}" in msg
    write_metadata(text["a"])  # the sidecar gives the same answer without a scan
    with open(text["a"] + ".meta.json") as f:
        assert json.load(f)["max_token_id"] == top
    assert max_token_id(text["a"]) == top
    msg = error(train=text["a"], vocab_size=top)
    assert f"set model.vocab_size >= {top + 1}" in msg
    # 200 documents, split 969,30,1: test gets round(0.999 * 200) .. 200 = 0 documents
    msg = error(train=text["a"], vocab_size=text["vocab"], split="969,30,1")
    assert "leaves the test split" in msg and "(200 documents) empty" in msg and "num_samples 0 for test" in msg
    validate_gpt_data(text["a"], vocab_size=text["vocab"], split="969,30,1", num_samples=(10, 10, 0))
    msg = error(train=text["a"], vocab_size=text["vocab"], split="x")
    assert "not a valid train,valid,test split" in msg
    msg = error(vocab_size=text["vocab"])
    assert "no data" in msg and "mock=True" in msg


def test_a_split_asked_for_no_samples_is_not_built_even_when_it_has_no_documents(text, tmp_path):
    # 200 documents at the default split 969,30,1: the test share rounds to no document; megatron-core used to
    # loop forever counting epochs of it although it was asked for 0 samples.
    train, valid, test = build_gpt_datasets(text["a"], seq_length=16, vocab_size=text["vocab"], seed=7,
                                            cache_dir=str(tmp_path / "cache"), num_samples=(64, 8, 0))
    assert test is None and len(train) >= 64 and len(valid) >= 8
