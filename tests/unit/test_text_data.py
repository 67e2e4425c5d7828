"""Text data: bad input to the tokenizer trainer and the document reader (the tokenizers themselves and the
multi-process tokenisation: tests/distributed/test_text_data_workers.py)."""
import json
import random

import pytest

spm = pytest.importorskip("sentencepiece")

from megatron_bottleneck.base.errors import DataError  # noqa: E402
from megatron_bottleneck.data.text import read_documents, train_tokenizer  # noqa: E402

WORDS = ("gradient bottleneck softmax vocabulary hidden rank head logit token model train learn "
         "the a of to and in is was for on with as by at from").split()


def corpus(path, docs=300, seed=0):
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(docs)]
    path.write_text("\n\n".join(paras) + "\n")
    return paras


def test_bad_text_input_is_explained(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="the files are empty"):
        train_tokenizer([str(empty)], 100, str(tmp_path / "x"))
    with pytest.raises(DataError, match="cannot read input file"):
        train_tokenizer([str(tmp_path / "missing.txt")], 100, str(tmp_path / "x"))
    corpus(tmp_path / "a.txt", docs=20)
    with pytest.raises(DataError, match="must exceed the 3 special tokens"):
        train_tokenizer([str(tmp_path / "a.txt")], 3, str(tmp_path / "x"))
    with pytest.raises(DataError, match="Use a smaller vocab_size or more text"):
        train_tokenizer([str(tmp_path / "a.txt")], 50000, str(tmp_path / "x"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError, match="no 'text' key"):
        list(read_documents(str(bad)))
