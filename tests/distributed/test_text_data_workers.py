"""SentencePiece and HuggingFace tokenizers trained on a small corpus, and multi-process tokenisation (worker
processes) into a Megatron indexed dataset, read back by megatron-core's IndexedDataset."""
import json

import pytest

spm = pytest.importorskip("sentencepiece")

from megatron_bottleneck.base.errors import DataError  # noqa: E402
from megatron_bottleneck.data.text import tokenize_to_indexed, train_tokenizer  # noqa: E402

from ..unit.test_text_data import corpus  # noqa: E402


def test_tokenizer_round_trip_and_parallel_tokenisation(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    paras = corpus(tmp_path / "a.txt")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": p}) for p in paras[:50]) + "\n")
    model = train_tokenizer([str(tmp_path / "a.txt")], 120, str(tmp_path / "tok" / "sp"))
    sp = spm.SentencePieceProcessor(model_file=model)
    for p in paras[:20]:
        assert sp.decode(sp.encode(p)) == p
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    one = tokenize_to_indexed(files, model, str(tmp_path / "one"), workers=1, chunk_size=16)
    two = tokenize_to_indexed(files, model, str(tmp_path / "two"), workers=2, chunk_size=16)
    assert one["documents"] == two["documents"] == 350
    assert open(tmp_path / "one.bin", "rb").read() == open(tmp_path / "two.bin", "rb").read()
    ds = IndexedDataset(str(tmp_path / "two"))
    assert len(ds) == 350
    assert list(ds[3]) == sp.encode(paras[3]) + [sp.eos_id()]
    assert sp.decode(list(ds[320][:-1])) == paras[20]  # jsonl documents follow the txt ones, in order


def test_huggingface_tokenizer_json(tmp_path):
    """A HuggingFace tokenizer.json (the tokenizers package) tokenises to the same indexed format."""
    tokenizers = pytest.importorskip("tokenizers")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    paras = corpus(tmp_path / "a.txt", docs=120)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train([str(tmp_path / "a.txt")], tokenizers.trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"]))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    out = tokenize_to_indexed([str(tmp_path / "a.txt")], path, str(tmp_path / "hf"), workers=2, chunk_size=16)
    eod = tok.token_to_id("</s>")
    assert out["documents"] == 120 and out["vocab_size"] == tok.get_vocab_size()
    ds = IndexedDataset(str(tmp_path / "hf"))
    assert list(ds[5]) == tok.encode(paras[5], add_special_tokens=False).ids + [eod]
    with pytest.raises(DataError, match=r"no end-of-document token among \['<eod>'\]; pass eod_token="):
        tokenize_to_indexed([str(tmp_path / "a.txt")], path, str(tmp_path / "x"), eod_token="<eod>")

