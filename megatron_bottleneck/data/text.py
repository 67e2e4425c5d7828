"""Real text: train a SentencePiece tokenizer and tokenise text / JSONL into a Megatron indexed dataset.

Documents: in ``.txt`` files, paragraphs separated by blank lines; in ``.jsonl`` files, one JSON object per
line with the text under ``text_key``. Each document is tokenised and followed by EOD. Tokenisation runs
in ``workers`` processes; the output keeps the input order. Special ids: unk 0, EOD 1, pad 2 (no BOS).
The tokenizer used is recorded beside the dataset (``<prefix>.tokenizer.json``), where ``eval`` finds it.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from ..base.errors import DataError

SPECIAL_TOKENS = 3  # unk, eod, pad


def _sentencepiece():
    try:  # optional dependency (the [data] extra)
        import sentencepiece as spm
    except ImportError as exc:
        raise DataError("real-text data needs SentencePiece: pip install sentencepiece "
                        "(or pip install 'megatron-bottleneck[data]')") from exc
    return spm


def _check_files(paths: Sequence[str]) -> List[str]:
    if not paths:
        raise DataError("no input files given")
    out = []
    for p in paths:
        if not os.path.isfile(p) or not os.access(p, os.R_OK):
            raise DataError(f"cannot read input file {p!r} (missing or not readable)")
        out.append(p)
    return out


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Documents of one file (see the module docstring for the formats)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if text_key not in obj:
                    raise DataError(f"{path}:{n}: no {text_key!r} key (set text_key to the field holding the text)")
                yield str(obj[text_key])
        else:
            para: List[str] = []
            for line in f:
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    yield "\n".join(para)
                    para = []
            if para:
                yield "\n".join(para)


def train_tokenizer(input_files: Sequence[str], vocab_size: int, model_prefix: str, model_type: str = "bpe",
                    text_key: str = "text", character_coverage: float = 1.0) -> str:
    """Train a SentencePiece model on the documents of ``input_files``; returns ``<prefix>.model``."""
    spm = _sentencepiece()
    files = _check_files(input_files)
    if vocab_size <= SPECIAL_TOKENS:
        raise DataError(f"vocab_size={vocab_size} must exceed the {SPECIAL_TOKENS} special tokens (unk, eod, pad)")
    docs = [d for p in files for d in read_documents(p, text_key) if d.strip()]
    if not docs:
        raise DataError(f"no text in {list(files)}: the files are empty")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_prefix=model_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, unk_id=0, eos_id=1, pad_id=2,
            bos_id=-1, minloglevel=2, hard_vocab_limit=True)
    except RuntimeError as exc:
        raise DataError(f"SentencePiece could not train a {vocab_size}-token {model_type} model on this data: "
                        f"{exc}. Use a smaller vocab_size or more text.") from None
    return model_prefix + ".model"


EOD_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[SEP]")


class _Tokenizer:
    """SentencePiece (``*.model``) or HuggingFace ``tokenizers`` (``tokenizer.json``): batch encode, EOD id,
    vocabulary size."""

    def __init__(self, model_file: str, eod_token: Optional[str] = None):
        if model_file.endswith(".json"):
            try:  # optional dependency
                from tokenizers import Tokenizer
            except ImportError:
                raise DataError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
            self.hf = Tokenizer.from_file(model_file)
            self.vocab_size = self.hf.get_vocab_size()
            names = [eod_token] if eod_token else list(EOD_TOKENS)
            ids = [self.hf.token_to_id(n) for n in names]
            self.eod = next((i for i in ids if i is not None), None)
            if self.eod is None:
                raise DataError(f"{model_file}: no end-of-document token among {names}; pass eod_token= with the "
                                "token this tokenizer ends documents with")
            self.sp = None
        else:
            self.sp = _sentencepiece().SentencePieceProcessor(model_file=model_file)
            self.vocab_size, self.eod = self.sp.vocab_size(), self.sp.eos_id()

    def encode(self, docs: List[str]) -> List[List[int]]:
        if self.sp is not None:
            return self.sp.encode(docs)
        return [e.ids for e in self.hf.encode_batch(docs, add_special_tokens=False)]


def _encode_with(tokenizer: _Tokenizer, docs: List[str]) -> List[List[int]]:
    """Each document's ids, then the EOD id."""
    return [ids + [tokenizer.eod] for ids in tokenizer.encode(docs)]


class _Worker:
    """A tokenising worker process's state (``ProcessPoolExecutor`` initializer): its one tokenizer, made at the
    worker's start and kept on this class in that spawned process only (the calling process never sets it)."""

    tokenizer: Optional[_Tokenizer] = None

    @staticmethod
    def start(model_file: str, eod_token: Optional[str] = None) -> None:
        _Worker.tokenizer = _Tokenizer(model_file, eod_token)

    @staticmethod
    def encode(docs: List[str]) -> List[List[int]]:
        return _encode_with(_Worker.tokenizer, docs)


def tokenize_to_indexed(input_files: Sequence[str], model_file: str, output_prefix: str, workers: int = 1,
                        text_key: str = "text", chunk_size: int = 256, eod_token: Optional[str] = None) -> Dict:
    """Tokenise every document (+ EOD) into ``<output_prefix>.bin/.idx``; returns counts.

    ``model_file``: a SentencePiece ``.model`` or a HuggingFace ``tokenizer.json`` (the ``tokenizers``
    package; the EOD token is ``eod_token`` or the first of ``EOD_TOKENS`` the vocabulary has).

    ``workers > 1`` tokenises in that many spawned processes. They re-import the calling script, so it
    needs an ``if __name__ == "__main__":`` guard and a file (not ``python - < script.py``); a worker that
    cannot start raises :class:`DataError` instead of hanging.
    """
    files = _check_files(input_files)
    if not os.path.isfile(model_file):
        raise DataError(f"tokenizer model {model_file!r} not found (train one with train_tokenizer, or pass a "
                        "HuggingFace tokenizer.json)")
    tokenizer = _Tokenizer(model_file, eod_token)
    vocab = tokenizer.vocab_size
    docs = [d for p in files for d in read_documents(p, text_key) if d.strip()]
    if not docs:
        raise DataError(f"no text in {list(files)}: the files are empty")
    chunks = [docs[i:i + chunk_size] for i in range(0, len(docs), chunk_size)]
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(vocab)
    builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    tokens = 0
    if workers > 1:
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_Worker.start, initargs=(model_file, eod_token)) as pool:
                for encoded in pool.map(_Worker.encode, chunks):  # in order
                    tokens += _add(builder, encoded, dtype)
        except BrokenProcessPool:
            raise DataError(f"tokenize_to_indexed: its {workers} worker processes could not start. Spawned workers "
                            "re-import the calling script: run it from a file with an `if __name__ == "
                            "\"__main__\":` guard (not from standard input), or pass workers=1.") from None
    else:
        for chunk in chunks:
            tokens += _add(builder, _encode_with(tokenizer, chunk), dtype)
    builder.finalize(output_prefix + ".idx")
    record_tokenizer(output_prefix, model_file, eod_token)
    return {"documents": len(docs), "tokens": tokens, "vocab_size": vocab, "prefix": output_prefix}


TOKENIZER_RECORD = ".tokenizer.json"


def record_tokenizer(prefix: str, model_file: str, eod_token: Optional[str] = None) -> str:
    """Write ``<prefix>.tokenizer.json`` naming the tokenizer a dataset was made with (what ``eval`` reads
    to turn text into the model's tokens); returns its path."""
    path = prefix + TOKENIZER_RECORD
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model_file": os.path.abspath(model_file), "eod_token": eod_token}, f)
    return path


def recorded_tokenizer(prefix: str) -> Optional[Dict]:
    """The ``{"model_file", "eod_token"}`` record :func:`tokenize_to_indexed` left beside ``prefix`` (None if
    there is none)."""
    path = prefix + TOKENIZER_RECORD
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(model_file: str, eod_token: Optional[str] = None) -> "_Tokenizer":
    """A SentencePiece ``.model`` or HuggingFace ``tokenizer.json``: ``encode(list of str) -> list of ids``,
    ``eod``, ``vocab_size``."""
    if not os.path.isfile(model_file):
        raise DataError(f"tokenizer model {model_file!r} not found (pass the SentencePiece .model or "
                        "HuggingFace tokenizer.json the data was tokenised with)")
    return _Tokenizer(model_file, eod_token)


def _add(builder, encoded: List[List[int]], dtype) -> int:
    n = 0
    for ids in encoded:
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        n += len(ids)
    return n
