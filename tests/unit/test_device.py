"""Devices as asked: the one device decision (CPU mode or not, which device, which backend, which dtype ``auto``
means), with CUDA availability faked; a GPU asked for and absent is one error line through the real command line;
CPU mode hides visible GPUs; launch() refuses a GPU layout that is not there before any rank starts."""
import os

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.device import DeviceChoice, choose_device, resolve_device
from megatron_bottleneck.base.errors import DeviceError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees ``n`` CUDA GPUs (0: none), as torch.cuda reports them."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MB_CPU"):
        monkeypatch.delenv(key, raising=False)
    return fake


# ---------------------------------------------------------------------------------------------- the decision
def test_nothing_asked_and_no_gpu_is_cpu_mode_gloo_fp32(gpus):
    gpus(0)
    for asked in (None, "", "auto"):
        choice = choose_device(asked)
        assert choice == DeviceChoice(torch.device("cpu"), cpu_mode=True, backend="gloo", dtype=torch.float32)


def test_nothing_asked_with_gpus_visible_is_the_local_rank_gpu_nccl_bf16(gpus, monkeypatch):
    gpus(2)
    choice = choose_device(None)
    assert choice == DeviceChoice(torch.device("cuda", 0), cpu_mode=False, backend="nccl", dtype=torch.bfloat16)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second rank on the node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    choice = choose_device("auto")
    assert (choice.device, choice.cpu_mode, choice.backend, choice.dtype) == (torch.device("cuda", 1), False, "nccl",
                                                                              torch.bfloat16)
    assert choose_device("cuda") == choice


def test_cpu_asked_with_gpus_visible_is_cpu_mode(gpus):
    gpus(4)
    assert choose_device("cpu") == DeviceChoice(torch.device("cpu"), True, "gloo", torch.float32)


def test_an_index_that_exists_is_that_gpu(gpus):
    gpus(2)
    assert choose_device("cuda:1") == DeviceChoice(torch.device("cuda", 1), False, "nccl", torch.bfloat16)


def test_a_gpu_that_is_not_there_is_one_error_line(gpus):
    gpus(1)
    with pytest.raises(DeviceError) as info:
        choose_device("cuda:1")
    assert str(info.value) == ("--device cuda:1 but this machine sees 1 CUDA GPU (cuda:0): use --device cuda or an "
                               "index below 1")
    gpus(0)
    for asked in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=rf"^--device {asked} but this machine sees no CUDA GPU: .*--device cpu$"):
            choose_device(asked)
    with pytest.raises(DeviceError, match=r"^train.device=cuda but this machine sees no CUDA GPU: .*train.device=cpu$"):
        choose_device("cuda", option="train.device")


def test_more_ranks_than_gpus_and_one_index_for_several_ranks_are_errors():
    with pytest.raises(DeviceError, match=r"^3 ranks on this node but this machine sees 2 CUDA GPUs \(cuda:0 to "
                                          r"cuda:1\): run at most 2 ranks per node"):
        resolve_device("auto", cuda_available=True, device_count=2, local_rank=0, local_world_size=3)
    with pytest.raises(DeviceError, match=r"^--device cuda:0 names one GPU for 2 ranks on this node: use --device cuda"):
        resolve_device("cuda:0", cuda_available=True, device_count=2, local_rank=0, local_world_size=2)
    # rank r of 2 on 2 GPUs: cuda:r
    assert [resolve_device("cuda", cuda_available=True, device_count=2, local_rank=r, local_world_size=2).device
            for r in range(2)] == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_malformed_requests_and_cuda_runtime_without_devices():
    for asked in ("gpu", "cuda:x", "cuda:-1", "mps"):
        with pytest.raises(DeviceError, match=r"use auto, cpu, cuda or cuda:N$"):
            resolve_device(asked, cuda_available=True, device_count=1)
    # a CUDA build that reports devices but is not available (no driver): no GPU
    assert resolve_device(None, cuda_available=False, device_count=8).cpu_mode


def test_a_gpu_job_without_gpus_needs_cpu_asked_for(gpus, monkeypatch):
    """Under torchrun / Slurm, auto without a GPU is an error unless CPU ranks are asked for (MB_CPU=1 or cpu)."""
    from megatron_bottleneck.train.trainer import torchrun_device

    gpus(0)
    with pytest.raises(DeviceError, match=r"^no CUDA GPU is visible to this torchrun / Slurm job \(host .*\): .*"
                                          r"MB_CPU=1 \(or train.device=cpu\)"):
        torchrun_device("auto")
    assert torchrun_device("cpu").cpu_mode
    monkeypatch.setenv("MB_CPU", "1")
    assert torchrun_device("auto") == DeviceChoice.cpu()
    gpus(8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert torchrun_device("auto").device == torch.device("cuda", 5)


# ------------------------------------------------------------------------------------- CPU mode and launch()
def test_cpu_mode_hides_visible_gpus_so_auto_precision_is_fp32(gpus):
    from megatron_bottleneck.measure.sources import _resolve_dtype
    from megatron_bottleneck.train import TrainConfig
    from megatron_bottleneck.train.trainer import _cpu_initialization, _precision

    gpus(2)
    cfg = TrainConfig()
    assert (_precision(cfg), _cpu_initialization(cfg)) == ("bf16", False)
    assert _resolve_dtype("auto", choose_device(None).device) == torch.bfloat16
    try:
        with mb.cpu_mode():
            assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
            assert choose_device(None) == DeviceChoice.cpu()
            assert (_precision(cfg), _cpu_initialization(cfg)) == ("fp32", True)
            assert _resolve_dtype("auto", choose_device(None).device) == torch.float32
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2  # the faked GPUs are back
    finally:
        mb.disable_cpu_mode()


def _never_runs():
    raise AssertionError("no rank may start")


def test_launch_refuses_missing_gpus_before_any_rank_starts(gpus):
    gpus(1)
    with pytest.raises(DeviceError, match=r"^2 ranks on this node but this machine sees 1 CUDA GPU \(cuda:0\)"):
        mb.launch(_never_runs, 2, device="cuda")
    with pytest.raises(DeviceError, match=r"^train.device=cuda:3 but this machine sees 1 CUDA GPU"):
        mb.launch(_never_runs, 1, device="cuda:3", option="train.device")
    gpus(0)
    with pytest.raises(DeviceError, match=r"^--device cuda but this machine sees no CUDA GPU"):
        mb.launch(_never_runs, 1, device="cuda")


# ------------------------------------------------------------------------------------------ the command line
def _cli(gpus, monkeypatch, capsys, *args):
    """The real command line's ``main`` on a machine that sees no GPU (whatever this one has): (exit code, stderr)."""
    from megatron_bottleneck.cli import main

    gpus(0)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "error" not in out
    return code, err


def _one_error_line(result, expected: str) -> None:
    code, err = result
    assert code == 2, err[-3000:]
    assert err.splitlines() == [expected], err[-3000:]  # one line, no traceback


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_measure_on_a_gpu_that_is_not_there_is_one_line(tmp_path, device, gpus, monkeypatch, capsys):
    (tmp_path / "docs.txt").write_text("a document\n")
    res = _cli(gpus, monkeypatch, capsys, "measure", str(tmp_path), "--data", str(tmp_path / "docs.txt"), "--out",
               str(tmp_path / "out"), "--device", device)
    _one_error_line(res, f"error: --device {device} but this machine sees no CUDA GPU: run where a GPU is visible "
                          "(check CUDA_VISIBLE_DEVICES, nvidia-smi), or use --device cpu")
    assert not (tmp_path / "out").exists()


def test_eval_on_a_gpu_that_is_not_there_is_one_line(tmp_path, gpus, monkeypatch, capsys):
    res = _cli(gpus, monkeypatch, capsys, "eval", str(tmp_path), "--device", "cuda:0")
    _one_error_line(res, "error: --device cuda:0 but this machine sees no CUDA GPU: run where a GPU is visible "
                          "(check CUDA_VISIBLE_DEVICES, nvidia-smi), or use --device cpu")


def test_bench_train_on_gpus_that_are_not_there_is_one_line(tmp_path, gpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = _cli(gpus, monkeypatch, capsys, "bench-train", os.path.join(ROOT, "examples", "cpu_demo.yaml"),
               "train.device=cuda", "data.mock=true", "--steps", "1")
    _one_error_line(res, "error: train.device=cuda but this machine sees no CUDA GPU: run where a GPU is visible "
                          "(check CUDA_VISIBLE_DEVICES, nvidia-smi), or use train.device=cpu")


# ------------------------------------------------------------------ the device of a collective (the D x D Gram)
def test_a_cpu_tensor_goes_to_the_gpu_for_nccl_and_stays_for_gloo(gpus, monkeypatch):
    from megatron_bottleneck.base.device import collective_device, communicator_device

    cpu = torch.device("cpu")
    assert collective_device("nccl", cpu, cuda_available=True, current_device=1) == torch.device("cuda", 1)
    assert collective_device("nccl", torch.device("cuda", 0), cuda_available=True, current_device=1) == \
        torch.device("cuda", 0)
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):  # a backend per device type takes CPU tensors itself
        assert collective_device(backend, cpu, cuda_available=True) == cpu
    with pytest.raises(DeviceError, match="NCCL but this process sees no CUDA GPU"):
        collective_device("nccl", cpu, cuda_available=False)
    # applied: the group's backend as torch.distributed reports it, CUDA as torch.cuda sees it (faked)
    gpus(2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    assert communicator_device(None, cpu) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert communicator_device(None, cpu) == cpu
