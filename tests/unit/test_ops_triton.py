"""The Triton kernels' dispatch decisions and argument checks (megatron_bottleneck.ops.triton_linear_cross_entropy);
the kernels themselves, interpreted and compiled for GPUs, are tested in ``tests/kernels/test_ops_triton_kernels.py``."""
import pytest
import torch

from megatron_bottleneck.ops import triton_linear_cross_entropy as tk

def test_should_use(monkeypatch):
    u = torch.randn(4, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MB_FUSED_KERNEL", "torch")
    assert not tk.should_use(u, None)
    monkeypatch.setenv("MB_FUSED_KERNEL", "auto")
    assert tk.should_use(u, None) == (tk.available() and u.is_cuda)  # False: CPU tensor
    monkeypatch.setenv("MB_FUSED_KERNEL", "bogus")
    with pytest.raises(ValueError, match="MB_FUSED_KERNEL"):
        tk.should_use(u, None)
    monkeypatch.setenv("MB_FUSED_KERNEL", "triton")
    assert not tk.should_use(u, object())  # fp8 stays on torch
    assert not tk.should_use(u.double(), None)  # float64 stays on torch
    with pytest.raises(ValueError, match="MB_FUSED_KERNEL=triton"):
        tk.should_use(u, None)  # CPU tensor without the interpreter (or no triton)
    if tk.available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert tk.should_use(u, None)
    # the kernel argument, which always wins: the env var is only the default
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MB_FUSED_KERNEL")
    assert tk.resolve_kernel() == "torch" and not tk.should_use(u, None)
    assert tk.resolve_kernel("auto") == "auto" and not tk.should_use(u, None, "auto")  # CPU tensor
    with pytest.raises(ValueError, match="kernel 'triton'"):
        tk.should_use(u, None, "triton")
    with pytest.raises(ValueError, match="kernel must be"):
        tk.should_use(u, None, "fast")
    monkeypatch.setenv("MB_FUSED_KERNEL", "triton")
    assert tk.resolve_kernel("torch") == "torch" and not tk.should_use(u, None, "torch")  # explicit wins
    assert tk.resolve_kernel() == "triton" and tk.resolve_kernel(None) == "triton"  # no argument: the env
    monkeypatch.setenv("MB_FUSED_KERNEL", "")  # empty: the default
    assert tk.resolve_kernel() == "torch" and tk.resolve_kernel("auto") == "auto"


def test_tile_configs_cover_every_gpu_family():
    # the family decision, and a configuration for every kernel x dtype x family
    assert [tk.family(c) for c in (80, 86, 89, 90, 100, 103, 120)] == ["sm80", "sm80", "sm80", "sm90", "sm100",
                                                                        "sm100", "sm80"]
    for kernel in tk.KERNEL_NAMES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for cap in (80, 86, 90, 100, 120):
                cfg = tk.tile_config(kernel, dtype, cap)
                assert cfg.block_m % 16 == 0 and cfg.block_n % 16 == 0 and cfg.block_k % 16 == 0
            assert tk.tile_config(kernel, dtype, None) == tk.INTERPRETER_CONFIG[kernel]


def test_backward_refuses_bad_gradient_buffers():
    if not tk.available():
        pytest.skip("triton is not importable")
    u, w = torch.randn(4, 8), torch.randn(10, 8)
    lse, coef = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="grad_u must be float32"):
        tk.backward_chunks(u, w, 10, lse, coef, torch.zeros(4, 8, dtype=torch.float64), torch.zeros(10, 8))
    with pytest.raises(ValueError, match="grad_w must be float32"):
        tk.backward_chunks(u, w, 10, lse, coef, torch.zeros(4, 8), torch.zeros(9, 8))
    with pytest.raises(ValueError, match="unit stride along k"):
        tk.backward_chunks(u, w, 10, lse, coef, torch.zeros(8, 4).t(), torch.zeros(10, 8))
    with pytest.raises(ValueError, match="one dtype"):
        tk.backward_chunks(u, w.double(), 10, lse, coef, torch.zeros(4, 8), torch.zeros(10, 8))
