"""``measure`` as a researcher uses it: what it accepts as MODEL (one line otherwise), the resolved dtype and
device in ``measure.json``, the plan line, the float64 per-row sums of ||G||^2 and the rank plot. The GGUF path
on a real pretrained model: tests/pretrained/test_smollm2.py."""
import json
import sys

import pytest
import torch

from megatron_bottleneck.measure.run import CPU_DOCUMENTS, MeasureConfig, plan_line
from megatron_bottleneck.measure.sources import LoadedModel
from megatron_bottleneck.probe.linalg import ROW_BLOCK, row_sq_norms
from megatron_bottleneck.probe.stats import StepAccumulator

transformers = pytest.importorskip("transformers", reason="measure's HuggingFace path needs transformers ([hf])")

from megatron_bottleneck.cli import main  # noqa: E402

from .test_measure import _one_line, save_tiny, token_docs  # noqa: E402,F401 (a fixture)


def _softmax_minus_onehot(t: int, v: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.softmax(torch.randn(t, v, generator=gen) * 3, dim=1)
    g[torch.arange(t), torch.randint(0, v, (t,), generator=gen)] -= 1.0
    return g


def test_row_sq_norms_are_float64_accurate_where_float32_sums_are_not():
    g = _softmax_minus_onehot(682, 49152)  # the chunk measure forms for SmolLM2 (V = 49,152) at 256 MiB
    exact = g.double().square().sum()
    one_norm = torch.linalg.vector_norm(g).double().square()  # what the accumulator summed before
    assert abs(float(one_norm / exact) - 1) > 1e-5  # float32 summation is off on this chunk
    assert float(row_sq_norms(g).sum() / exact) == pytest.approx(1.0, abs=2e-7)
    acc = StepAccumulator(padding=False)
    from megatron_bottleneck.base.head import HeadView

    acc.add_logit_grad(g, HeadView(factor=torch.zeros(49152, 4), mix=None, vocab_start=0, vocab_size=49152))
    assert float(acc.g2 / exact) == pytest.approx(1.0, abs=2e-7)


@pytest.mark.parametrize("cols", [1, ROW_BLOCK - 1, ROW_BLOCK, 3 * ROW_BLOCK + 7])
def test_row_sq_norms_any_width_and_column_slices(cols):
    g = _softmax_minus_onehot(5, cols + 9, seed=cols)
    sliced = g[:, :cols]  # non-contiguous rows, as the probe's valid-column slice
    assert torch.allclose(row_sq_norms(sliced), sliced.double().square().sum(1), rtol=1e-6, atol=0)
    assert torch.allclose(row_sq_norms(sliced.double()), sliced.double().square().sum(1), rtol=1e-13, atol=0)


def _loaded(device: str, vocab: int = 49152) -> LoadedModel:
    from megatron_bottleneck.base.head import HeadView

    return LoadedModel(name="m", hidden=None, view=HeadView(torch.zeros(vocab, 8), None, 0, vocab), bias=None,
                       tokenize=None, max_length=8192, device=torch.device(device), kind="hf", dtype=torch.float32)


def test_plan_line_states_the_run_and_suggests_a_size_when_it_takes_hours_on_a_cpu():
    line = plan_line(_loaded("cpu"), MeasureConfig(), CPU_DOCUMENTS, 200_000, 1024, 4096, rate=20.0)
    assert "200 documents, 200,000 tokens (<= 1024 per document), on cpu in float32" in line
    assert "rank budget 4096 tokens (1.62 GiB float64)" in line  # 4096 x 49152 x 8 + 4096^2 x 8 bytes
    assert "about 166.7 min" in line and "CPU defaults for documents and seq-length" in line
    assert "that is 2.8 h on this CPU: --documents 72 fits about an hour" in line
    quick = plan_line(_loaded("cpu"), MeasureConfig(documents=40, seq_length=128), 40, 4000, 128, 256, rate=400.0)
    assert "hours" not in quick and "h on this CPU" not in quick and "CPU defaults" not in quick
    gpu = plan_line(_loaded("cuda"), MeasureConfig(), 10000, 10**7, 8192, 4096, rate=100.0)
    assert "h on this CPU" not in gpu  # a GPU run is as long as it is


def test_measure_json_has_the_resolved_dtype_and_device_and_a_full_rank_plot(tmp_path, token_docs, capsys):  # noqa: F811
    folder = save_tiny("llama", tmp_path / "m")
    assert main(["measure", folder, "--data", token_docs, "--out", str(tmp_path / "out"), "--seq-length", "24",
                 "--rank-budget", "32", "--batch-size", "2", "--no-progress"]) == 0
    res = json.load(open(tmp_path / "out" / "measure.json"))
    assert (res["dtype"], res["dtype_requested"], res["device"]) == ("float32", "auto", "cpu")
    err = capsys.readouterr().err
    assert "documents" in err and "tok/s after a first batch" in err and "CPU defaults for documents" in err
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "rank_curve.png"
    assert png.stat().st_size > 5000
    assert "![rank curve](rank_curve.png)" in (tmp_path / "out" / "measure.md").read_text()


def test_a_folder_that_is_neither_hf_nor_gguf_is_one_line(tmp_path, token_docs, capsys):  # noqa: F811
    (tmp_path / "empty").mkdir()
    line = _one_line(["measure", str(tmp_path / "empty"), "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert "no config.json and no .gguf file" in line and "a .gguf file or a folder holding one" in line
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    line = _one_line(["measure", str(two), "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert "holds 2 GGUF files (a.gguf, b.gguf)" in line
    line = _one_line(["measure", str(tmp_path / "missing.gguf"), "--data", token_docs, "--out", str(tmp_path / "o")],
                     capsys)
    assert "no such GGUF file" in line


def test_a_gguf_without_its_extras_is_one_line(tmp_path, token_docs, monkeypatch, capsys):  # noqa: F811
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # gguf not installed
    assert main(["measure", str(fake), "--data", token_docs, "--out", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    assert "is a GGUF file; reading it needs gguf" in err[0] and "megatron-bottleneck[hf]" in err[0]
