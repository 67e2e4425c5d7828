"""Errors cross process boundaries as one line: ``launch`` re-raises our errors with their type and message,
and anything else as one RankFailure line per distinct message, tracebacks kept for --debug."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

import megatron_bottleneck as mb
from megatron_bottleneck.base.errors import DataError


def raise_ours(on_ranks):
    if dist.get_rank() in on_ranks:
        raise DataError(f"bad data on every listed rank ({len(on_ranks)} of them)")
    dist.barrier()  # the others wait on a collective the failed rank never joins
    return "ok"


def raise_other():
    raise KeyError(f"missing thing {dist.get_rank()}")


def threads():
    import torch
    return torch.get_num_threads()


def test_ranks_take_the_callers_omp_num_threads_else_split_the_cores(monkeypatch):
    from megatron_bottleneck.integrations.launch import rank_threads

    cores = os.cpu_count() or 1
    assert rank_threads(2, {}) == max(1, cores // 2) and rank_threads(1, {"OMP_NUM_THREADS": "x"}) == cores
    assert rank_threads(2, {"OMP_NUM_THREADS": "3"}) == 3 and rank_threads(2, {"OMP_NUM_THREADS": "0"}) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # CI's lanes: one core each
    assert mb.launch(threads, 2, timeout=120) == [1, 1]


def test_our_error_comes_back_with_its_type_and_one_message():
    with pytest.raises(DataError) as info:
        mb.launch(raise_ours, 2, (0, 1), timeout=120)
    assert str(info.value) == "bad data on every listed rank (2 of them)"
    assert info.value.messages == ["bad data on every listed rank (2 of them)"]  # deduplicated
    assert set(info.value.tracebacks) == {0, 1} and "raise_ours" in info.value.tracebacks[0]


def test_one_failing_rank_does_not_hang_the_others():
    with pytest.raises(DataError):
        mb.launch(raise_ours, 2, (1,), timeout=120)


def test_other_errors_are_one_line_per_rank_message():
    with pytest.raises(mb.RankFailure) as info:
        mb.launch(raise_other, 2, timeout=120)
    assert sorted(info.value.messages) == ["rank 0: KeyError: 'missing thing 0'", "rank 1: KeyError: 'missing thing 1'"]


def test_a_pool_that_cannot_start_fails_clearly(tmp_path):
    """Spawned workers re-import the main script; from standard input they cannot: a clear error, no hang."""
    pytest.importorskip("sentencepiece")
    from megatron_bottleneck.data import train_tokenizer

    (tmp_path / "a.txt").write_text("\n\n".join(f"document {i} about gradients and heads" for i in range(200)))
    model = train_tokenizer([str(tmp_path / "a.txt")], 60, str(tmp_path / "sp"))
    job = textwrap.dedent(f"""
        from megatron_bottleneck.data import tokenize_to_indexed
        from megatron_bottleneck.base.errors import DataError
        try:
            tokenize_to_indexed([{str(tmp_path / "a.txt")!r}], {model!r}, {str(tmp_path / "out")!r}, workers=2,
                                chunk_size=8)
        except DataError as e:
            print("DataError:", e)
    """)
    proc = subprocess.run([sys.executable, "-"], input=job, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "DataError: tokenize_to_indexed: its 2 worker processes could not start" in proc.stdout, proc.stderr[-2000:]


def where_am_i():
    import torch

    from megatron_bottleneck.integrations.cpu import is_cpu_mode

    x = torch.ones(2, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(x)
    return {"device": str(x.device), "backend": dist.get_backend(), "cpu_mode": is_cpu_mode(),
            "cuda_visible": torch.cuda.is_available(), "sum": x.tolist()}


def test_ranks_run_where_the_device_decision_says():
    """auto without a GPU, and cpu always: CPU ranks (gloo, CPU mode, no GPU visible inside); with GPUs, auto and
    cuda: rank r on cuda:r with NCCL and no CPU mode."""
    import torch

    world = 2
    for device in ("cpu",) + (() if torch.cuda.is_available() else ("auto",)):
        got = mb.launch(where_am_i, world, timeout=300, device=device)
        assert got == [{"device": "cpu", "backend": "gloo", "cpu_mode": True, "cuda_visible": False,
                        "sum": [2.0, 2.0]}] * world
    if torch.cuda.is_available():
        n = min(world, torch.cuda.device_count())
        for device in ("auto", "cuda"):
            got = mb.launch(where_am_i, n, timeout=300, device=device)
            assert got == [{"device": f"cuda:{r}", "backend": "nccl", "cpu_mode": False, "cuda_visible": True,
                            "sum": [float(n)] * 2} for r in range(n)]
