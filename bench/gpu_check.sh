#!/usr/bin/env bash
# The GPU checks of the fused head + loss, as one prepared run for a lent GPU machine (about 10 minutes on an H100).
#
#   bash bench/gpu_check.sh [OUTDIR]        # from the repository root, megatron-bottleneck installed
#
# 1. the GPU-only tests: the Triton kernels against the torch loops and a float64 reference, bitwise
#    reproducible backward (tests/kernels/test_ops_triton_kernels.py, which also compiles them for sm_80/sm_90a/sm_100a:
#    0 spills for 16-bit inputs), the FP8 backbone through Transformer Engine (skipped without TE), the torch
#    loop's float32-output GEMMs against their CPU emulation (test_gpu_fp32_output_gemms_equal_their_cpu_emulation);
#    bench/triton_resources.py: registers / spills / shared memory of every Triton kernel as shipped;
# 2. bench/head_loss.py in bf16 at T=8192, D=2048, V=131072: Megatron dense/unfused, fused (torch loops and
#    Triton), torch's chunked op, and Liger-Kernel / cut-cross-entropy where installed (their rows say n/a else);
# 3. the probe's overhead on the fused head (rank 256).
# Everything lands in OUTDIR (default: $OUT, else bench/results/gpu); copy the tables into bench/RESULTS.md.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import sys, torch; torch.cuda.is_available() or sys.exit('gpu_check: no CUDA GPU visible'); print(torch.__version__, torch.cuda.get_device_name())" \
    >"$out/device.txt" || exit 1
cat "$out/device.txt"
python -m pytest -q -rs tests/kernels/test_ops_triton_kernels.py tests/unit/test_ops_triton.py tests/distributed/test_fp8_backbone.py \
    tests/unit/test_ops_linear_cross_entropy.py -k "triton or fp8 or gpu" 2>&1 | tee "$out/gpu_tests.txt"
python bench/triton_resources.py --json "$out/triton_resources.json" 2>&1 | tee "$out/triton_resources.txt"
python bench/head_loss.py --T 8192 --D 2048 --V 131072 --ranks 128,512,2048 --reps 5 \
    --out "$out/head_loss_gpu.json" 2>"$out/head_loss_gpu.log" | tee "$out/head_loss_gpu.txt"
python bench/probe_overhead.py --hidden 2048 --vocab 65536 --layers 4 --seq 2048 --micro 2 --num-micro 4 --reps 10 \
    --head-rank 256 --fused-loss --out "$out/probe_overhead_fused_gpu.json" 2>&1 | tail -8 | tee "$out/probe_overhead_fused_gpu.txt"
