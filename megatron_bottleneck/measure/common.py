"""What the model sources of ``measure`` share: :class:`ModelError`, the ``transformers`` import (a missing
extra is one line) and the tokenizer that refuses text in one line when a model has none."""
from __future__ import annotations

from ..base.errors import BottleneckError, DataError

__all__ = ["ModelError", "HF_INSTALL", "import_transformers", "no_tokenizer"]

HF_INSTALL = "pip install 'megatron-bottleneck[hf]'"


class ModelError(BottleneckError):
    """A model cannot be measured as given (unknown, missing extra, head not linear)."""


def import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ModelError(f"measuring a HuggingFace model needs transformers: {HF_INSTALL}") from None
    return transformers


def no_tokenizer(name: str, exc: BaseException):
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__

    def tokenize(_text: str):
        raise DataError(f"--data is text, but {name}'s tokenizer does not load ({reason}); save a tokenizer with "
                        "the model, or give token ids (a .jsonl with 'tokens' lists, or an indexed dataset)")

    return tokenize
