"""Fixtures shared by the test modules.

Single-process tests live in ``tests/unit``, multi-process ones (gloo ranks on 127.0.0.1 through
``megatron_bottleneck.launch``) in ``tests/distributed``. Functions run on ranks must be importable: they
sit in the test modules themselves or in ``tests/support.py``.
"""
import os
import warnings

import pytest

import megatron_bottleneck as mb
from tests import support

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The TP=1 references, their checkpoints shared by every layout test: the rank-16 model (and its step's
    results) and the dense-head model."""
    root = tmp_path_factory.mktemp("reference")
    result = mb.launch(support.save_reference, 1, 16, str(root / "ckpt"), timeout=300)[0]
    mb.launch(support.save_reference, 1, None, str(root / "dense_ckpt"), timeout=300)
    return {"ckpt": str(root / "ckpt"), "dense_ckpt": str(root / "dense_ckpt"), "result": result}


@pytest.fixture(scope="session")
def spamlang(tmp_path_factory):
    """A small SpamLang dataset (V=64, 8-token sequences): train and valid prefixes."""
    from megatron_bottleneck.data import SpamLangConfig, generate_spamlang

    return generate_spamlang(SpamLangConfig(64, 8, 800, seed=3), os.path.join(tmp_path_factory.mktemp("data"), "spam"))


@pytest.fixture(scope="module")
def megatron_one_rank():
    """Megatron-Core in this very process: a one-rank gloo group, CPU mode and parallel state (TP=PP=1),
    all undone afterwards. For single-process tests of Megatron models."""
    import torch.distributed as dist

    store = dist.HashStore()  # one rank: no port to race for
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with mb.cpu_mode():
            mb.initialize_parallel(1, 1, seed=1)
            yield
            mb.destroy_parallel()
    finally:
        dist.destroy_process_group()
