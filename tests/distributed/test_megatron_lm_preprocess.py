"""Megatron-LM's own tools/preprocess_data.py (a real run, in its own process): its .bin/.idx output reads through
megatron-bottleneck's GPT data (megatron-core's GPTDataset), and a token id beyond the vocabulary is one error line."""
import json
import os
import random
import subprocess
import sys

import pytest

from megatron_bottleneck.base.errors import DataError
from megatron_bottleneck.data.gpt_data import IdTokenizer, build_gpt_datasets, validate_gpt_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEGATRON_LM = os.path.join(REPO, "..", "shared", "megatron-lm", "core_v0.16.1")


def test_megatron_lm_preprocess_data_output_reads_through_it(tmp_path):
    tool = os.path.join(MEGATRON_LM, "tools", "preprocess_data.py")
    if not os.path.exists(tool):
        pytest.skip(f"Megatron-LM's tools/preprocess_data.py not found at {tool}")
    rng = random.Random(0)
    with open(tmp_path / "in.jsonl", "w") as f:
        for _ in range(50):
            f.write(json.dumps({"text": " ".join(str(rng.randrange(3, 100)) for _ in range(rng.randint(2, 30)))}) + "\n")
    env = dict(os.environ, PYTHONPATH=MEGATRON_LM, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                        str(tmp_path / "lm"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                        "--append-eod", "--workers", "1"], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ModuleNotFoundError" in r.stderr or "ImportError" in r.stderr):
        pytest.skip("preprocess_data.py cannot import its dependencies here: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-2000:]
    prefix = str(tmp_path / "lm_text_document")
    with pytest.raises(DataError, match="has token id 100 .* set model.vocab_size >= 101"):  # NullTokenizer's EOD
        validate_gpt_data(prefix, vocab_size=100, split="90,10,0")
    train, valid, _ = build_gpt_datasets(prefix, seq_length=16, vocab_size=101, split="90,10,0",
                                         tokenizer=IdTokenizer(101, eod=100, pad=-1), cache_dir=str(tmp_path / "c"))
    assert train[0]["tokens"].shape == (16,) and len(valid) > 0

