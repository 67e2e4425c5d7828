"""Triton kernels of the fused LM head + cross-entropy (megatron_bottleneck.ops.triton_linear_cross_entropy), run
and compiled for real: minutes on a CPU machine when Triton's cache is cold, so outside the quick tier
(``tests/unit/test_ops_triton.py`` keeps the kernels' dispatch decisions and argument checks).

CPU: the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 before triton is imported
(other tests import it earlier), so the checks of ``tests/kernels/triton_lce_checks.py`` run in a
subprocess at tiny shapes. GPU: the same checks in process on CUDA at bigger shapes. Tolerances are in
that module's docstring (float32: loss / lse 1e-5, gradients 1e-4 against float64; bfloat16 2e-2 and
float16 5e-3 for gradients; bf16 on Zipfian labels / peaked logits no less accurate than the unfused
bf16 path). Note: the interpreter multiplies bfloat16 dot operands as raw bits, so
under it the kernels upcast bfloat16 tiles to float32 before ``tl.dot`` (never on a GPU). Without a GPU the
kernels are also compiled for sm_80, sm_90a and sm_100a and their registers, spills and shared memory read back.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_bottleneck.ops import triton_linear_cross_entropy as tk

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the GPU test runs compiled kernels")
    from tests.kernels import triton_lce_checks as checks

    monkeypatch.setenv("MB_FUSED_KERNEL", "triton")
    chunk_cases = [(dt, 1000, 256, 5000, 4990, tr, ch) for dt, tr, ch in
                   ((torch.float32, False, None), (torch.bfloat16, True, 1500), (torch.float16, False, 1024))]
    chunk_cases += [(torch.float32, 37, 40, 300, 290, False, 100), (torch.bfloat16, 4096, 512, 4096, 4000, False, None),
                    (torch.bfloat16, 333, 2049, 3000, 2999, False, 1000)]
    public_cases = [(1000, 96, 3000, 2990, 7, dict(label_smoothing=0.1, z_loss_weight=1e-3)),
                    (333, 200, 1000, 1000, 0, {})]
    accuracy_cases = [(2048, 128, 4096, 4096, 0, {}),
                      (2048, 128, 4100, 4000, 7, dict(label_smoothing=0.1, z_loss_weight=1e-3))]
    n = checks.run_all("cuda", chunk_cases, public_cases, accuracy_cases)
    assert n == len(chunk_cases) + len(public_cases) + len(accuracy_cases)
def _run(code_or_module, env_extra, module=False):
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = ["-m", code_or_module] if module else ["-c", code_or_module]
    return subprocess.run([sys.executable, "-W", "ignore", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)



def test_triton_kernels_match_torch_and_reference_in_interpreter():
    pytest.importorskip("triton")
    out = _run("tests.kernels.triton_lce_checks", {"TRITON_INTERPRET": "1", "MB_FUSED_KERNEL": "triton"}, module=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK"), out.stdout


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, os\n"
            "from megatron_bottleneck.ops import triton_linear_cross_entropy as tk, linear_cross_entropy\n"
            "assert not tk.available(); u = torch.randn(4, 8)\n"
            "assert not tk.should_use(u, None)\n"
            "loss = linear_cross_entropy(u, torch.randn(10, 8), torch.tensor([1, 2, 3, 4]))\n"
            "os.environ['MB_FUSED_KERNEL'] = 'triton'\n"
            "try:\n    tk.should_use(u, None)\nexcept ValueError as e:\n    print('raised', e)\n")
    out = _run(code, {"MB_FUSED_KERNEL": "auto"})
    assert out.returncode == 0, out.stderr
    assert "raised" in out.stdout and "not importable" in out.stdout


def test_triton_kernels_compile_for_sm80_sm90a_sm100a_without_spills():
    """Every kernel at its shipped configurations, compiled by Triton for sm_80, sm_90a and sm_100a without a
    GPU and read back with the wheel's ptxas -v: 0 spill bytes for 16-bit inputs, shared memory within the
    family's limit (sm80 family: 99 KB, as sm_86 / sm_89). Cold, the 36 compiles took 23 s on a quiet 2-core
    machine (2026-12-04; 5-8 minutes on two shared cores of a slower one); warm, a few seconds
    (bench/triton_resources.py fills the same cache, whose key includes the kernels' source lines)."""
    reason = tk.compile_unavailable()
    if reason:
        pytest.skip(f"cannot compile Triton kernels for NVIDIA GPUs here: {reason}")
    rows = tk.compile_resources()
    kernels = {"lse_fwd", "grad_logits", "mm_acc dU (Gc @ F)", "mm_acc dW (Gc^T @ u)"}
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in rows} == {
        (k, d, a) for k in kernels for d in ("bf16", "fp16", "fp32") for a in ("sm_80", "sm_90a", "sm_100a")}
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} {r['arch']}"
        assert r["target"] == r["arch"], where
        assert 0 < r["registers"] <= 255, where
        assert 0 < r["shared_bytes"] <= r["shared_limit"], f"{where}: {r['shared_bytes']} B shared"
        if r["dtype"] != "fp32":
            assert r["spill_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{where}: {r['spill_bytes']} B spilled"


def test_softcap_bias_class_weight_kernels_compile_for_sm90a_without_spills():
    """The two logit kernels with every option on (HAS_CAP: x = c tanh(z / c) in the forward tile, the cap's
    slope in the logit gradient; HAS_BIAS: the bias tile, the bias gradient's column sums; HAS_W: the class
    weights in the smoothing sum and term), bf16 inputs, compiled for sm_90a without a GPU: the extra registers
    still spill nothing (ptxas -v), shared memory within the family's limit. Two compiles."""
    reason = tk.compile_unavailable()
    if reason:
        pytest.skip(f"cannot compile Triton kernels for NVIDIA GPUs here: {reason}")
    rows = tk.compile_resources(dtypes=("bf16",), archs=("sm_90a",), softcap=True, extras=True)
    assert {r["kernel"] for r in rows} == {"lse_fwd", "grad_logits"}
    for r in rows:
        assert r["target"] == "sm_90a" and 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0 and r["spill_load_bytes"] == 0, f"{r['kernel']}: {r['spill_bytes']} B spilled"
        assert 0 < r["shared_bytes"] <= r["shared_limit"], r
