"""Fixtures shared by the test modules.

Where a test lives says what it starts: ``tests/unit`` runs in this process (no rank, no worker, no compiler;
one fresh interpreter checks what importing does: the quick tier); ``tests/distributed`` starts processes (gloo
ranks on 127.0.0.1 through ``megatron_bottleneck.launch``, torchrun, the CLI, worker pools and forked checkpoint
writers, Megatron-LM's tools); ``tests/kernels``
compiles and interprets the Triton kernels; ``tests/slurm``, ``tests/pretrained`` and ``tests/bridge`` need a
local Slurm, a pretrained model and Megatron-Bridge. Functions run on ranks must be importable: they sit in the
test modules themselves or in ``tests/support.py``.

Test tiers: ``pytest tests/unit`` is the quick tier; every test also carries one area marker (``AREAS``
below, by the file's name), so ``pytest -m heads`` runs everything about heads, unit and distributed. A test
file whose name matches no area stops the collection: add it to ``AREAS``.
"""
import os
import warnings

import pytest

import megatron_bottleneck as mb
from tests import support

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

# area -> substrings of test file names (the first area that matches wins; README lists the areas' times)
AREAS = (
    ("slurm", ("test_slurm_",)),
    ("bridge", ("bridge",)),
    ("megatron_lm", ("megatron_lm", "forward_step_wrapper")),
    ("probe", ("probe",)),
    ("loss", ("ops_", "fused_head", "fp8", "loss")),
    ("heads", ("head", "layers", "hybrid", "param_tags", "from_dense", "convert", "mtp")),
    ("measure", ("measure", "smollm2", "eval", "report", "zoo")),
    ("trainer", ("trainer", "config", "checkpoint", "resume", "lr_schedule", "optimizer_format", "gpt_data",
                 "spamlang", "text_data")),
    ("runtime", ("cpu_mode", "device", "launch", "lightning")),
    ("cli", ("cli", "examples", "readme", "docs")),
)


def area_of(filename: str) -> str:
    """The area marker of a test file (``tests/unit/test_probe_math.py`` -> ``probe``)."""
    name = os.path.basename(filename)
    for area, keys in AREAS:
        if any(k in name for k in keys):
            return area
    raise pytest.UsageError(f"{filename}: no test area matches its name; add it to AREAS in tests/conftest.py")


class AreaTimes:
    """Sums each area's setup + call + teardown seconds and prints them at the end (README's tier times)."""

    def __init__(self):
        self.seconds: dict = {}

    def pytest_runtest_logreport(self, report):
        area = area_of(report.fspath)
        self.seconds[area] = self.seconds.get(area, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter):
        if self.seconds:
            terminalreporter.write_sep("=", "seconds per test area (pytest -m AREA)")
            for area, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
                terminalreporter.write_line(f"{area:>12} {sec:8.1f}")


def pytest_configure(config):
    config.pluginmanager.register(AreaTimes(), "megatron-bottleneck-area-times")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, area_of(str(item.fspath))))


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
