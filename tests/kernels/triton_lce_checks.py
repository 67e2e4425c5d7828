"""Checks of the Triton LCE kernels against the torch loops and the float64 reference.

Run as ``python -m tests.kernels.triton_lce_checks`` under TRITON_INTERPRET=1 (CPU, tiny shapes) by
``test_ops_triton_kernels.py``; its GPU test imports the same functions and runs them on CUDA at bigger shapes.
Tolerances (max-abs error relative to the reference's max-abs): float32 against the float64 math of the
same inputs, lse 1e-5, gradients 1e-4 (loss 1e-5 through the public op); bfloat16 / float16 inputs: lse
1e-5 (float32 accumulation of exact products), gradients 2e-2 / 5e-3 (G is rounded to the input dtype
for the GEMMs). :func:`check_bf16_accuracy`: the public op on the Triton path with bfloat16 inputs,
Zipfian labels and peaked (trained-like) logits is no less accurate than the unfused bf16 path against
float64 (dL/dW of the frequent rows and whole, dL/du).
"""
import os
import sys
import time

import torch

from megatron_bottleneck.ops import linear_cross_entropy, linear_cross_entropy_reference
from megatron_bottleneck.ops import triton_linear_cross_entropy as tk
from megatron_bottleneck.ops.linear_cross_entropy import HeadLossStats, _backward_chunks, _forward_chunks
from megatron_bottleneck.ops.reference import gradient_errors, peaked_zipf_problem, unfused_loss

GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _close(name, a, b, tol):
    e = rel(a, b)
    assert e <= tol, f"{name}: relative error {e:.3g} > {tol:g}"


def check_chunks(device, dtype, t, k, v_rows, n_real, transposed_u=False, chunk=None, seed=0):
    """forward_stats / backward_chunks (vocab chunks of ``chunk`` rows, None: one) against float64 math
    (and the torch loops in float32); the backward twice, bitwise equal (no atomics)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(k, t, generator=gen).t() if transposed_u else torch.randn(t, k, generator=gen)
    w = torch.randn(v_rows, k, generator=gen) / k**0.25
    u, w = u.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    assert tk.should_use(u, None), "the Triton path was not selected"
    coef = torch.randn(t, generator=gen)
    coef[::5] = 0.0  # zeros and negatives
    bt = tk._config("grad_logits", u)[0].block_m
    if t > bt:
        coef[:bt] = 0.0  # a whole token block of zeros: its tiles skip the logit GEMM
    tgt = torch.randint(-1, max(n_real, 1), (t,), generator=gen)  # -1: target not on this shard
    b = 0.9 * coef.abs()  # one-hot factor (0 where coef is 0, as for ignored tokens)
    e = 0.01 * coef
    coef, tgt, b, e = coef.to(device), tgt.to(device), b.to(device), e.to(device)

    lse, lse2, z_y, sum_z = tk.forward_stats(u, w, n_real, True, tgt, True)
    z = u.double() @ w[:n_real].double().t()
    ref_lse, ref_lse2 = torch.logsumexp(z, 1), torch.logsumexp(2 * z, 1)
    if n_real == 0:
        assert bool(torch.isneginf(lse).all()) and bool(torch.isneginf(lse2).all())
        assert bool((z_y == 0).all()) and bool((sum_z == 0).all())
        return
    _close("lse", lse, ref_lse, 1e-5)
    _close("lse2", lse2, ref_lse2, 1e-5)
    ref_zy = torch.where(tgt >= 0, z.gather(1, tgt.clamp(min=0)[:, None]).squeeze(1), 0.0)
    _close("z_y", z_y, ref_zy, 1e-5)
    _close("sum_z", sum_z, z.sum(1), 1e-5)
    assert tk.forward_stats(u, w, n_real, False)[1] is None

    onehot = torch.zeros_like(z)
    onehot[tgt >= 0, tgt[tgt >= 0]] = 1.0
    for with_targets in (False, True):
        gu = torch.full((t, k), 0.5, dtype=torch.float32, device=device)  # "+=" semantics
        gw = torch.full((v_rows, k), 0.25, dtype=torch.float32, device=device)
        extra = (tgt, b, e) if with_targets else ()
        tk.backward_chunks(u, w, n_real, ref_lse.float(), coef, gu, gw, *extra, chunk=chunk)
        if not with_targets:  # one (b, e) = None path: the tensors as above
            gu_again, gw_again = torch.full_like(gu, 0.5), torch.full_like(gw, 0.25)
            tk.backward_chunks(u, w, n_real, ref_lse.float(), coef, gu_again, gw_again, chunk=chunk)
            assert bool((gu_again == gu).all()) and bool((gw_again == gw).all()), "backward not deterministic"
        p = coef.double()[:, None] * torch.exp(z - ref_lse[:, None])
        if with_targets:
            p = p - b.double()[:, None] * onehot - e.double()[:, None]
        tol = GRAD_TOL[dtype]
        _close("grad_u", gu - 0.5, p @ w[:n_real].double(), tol)
        _close("grad_w", gw[:n_real] - 0.25, p.t() @ u.double(), tol)
        assert bool((gw[n_real:] == 0.25).all()), "padding rows got a gradient"

        if dtype == torch.float32:  # and the torch loops, same inputs
            tl_lse, tl_lse2, tl_zy, tl_sz = _forward_chunks(u, w, n_real, 16, True, None, tgt, True)
            _close("lse vs torch", lse, tl_lse, 1e-5)
            _close("lse2 vs torch", lse2, tl_lse2, 1e-5)
            _close("z_y vs torch", z_y, tl_zy, 1e-5)
            _close("sum_z vs torch", sum_z, tl_sz, 1e-5)
            gu2 = torch.full((t, k), 0.5, dtype=torch.float32, device=device)
            gw2 = torch.full((v_rows, k), 0.25, dtype=torch.float32, device=device)
            _backward_chunks(u, w, n_real, 16, ref_lse.float(), coef, None, gu2, gw2, *extra)
            _close("grad_u vs torch", gu, gu2, 1e-4)
            _close("grad_w vs torch", gw, gw2, 1e-4)


def check_public(device, t, k, v_rows, vocab, ignore_every=0, seed=0, chunk_size=None, bias=False, ce_weight=False,
                 **kw):
    """linear_cross_entropy on the Triton path (float32) against the float64 reference and the torch path
    (both with ``chunk_size`` vocab rows per chunk, None: the op's choice). ``bias`` / ``ce_weight``: a random
    logit bias [V_rows] / class weights [V] (the reference then torch's cross-entropy of u W^T + bias,
    tests/support_loss.reference_loss)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(t, k, generator=gen, dtype=torch.float64)
    w = torch.randn(v_rows, k, generator=gen, dtype=torch.float64) / k**0.25
    y = torch.randint(0, vocab, (t,), generator=gen)
    if ignore_every:
        y[::ignore_every] = -100
    g = torch.rand(t, generator=gen, dtype=torch.float64)
    b = torch.randn(v_rows, generator=gen, dtype=torch.float64) if bias else None
    cw = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5 if ce_weight else None
    u, w, y, g = u.to(device), w.to(device), y.to(device), g.to(device)

    u64, w64 = u.clone().requires_grad_(), w.clone().requires_grad_()
    b64 = None if b is None else b.to(device).requires_grad_()
    if b is None and cw is None:
        ref = linear_cross_entropy_reference(u64, w64, y, vocab_size=vocab, **kw)
    else:
        from tests.support_loss import reference_loss

        a = u64 @ w64.t() + (0.0 if b64 is None else b64)
        ref = reference_loss(a[:, :vocab], y, dict(kw, ce_weight=None if cw is None else tuple(cw.tolist())))
    (ref.double() * g).sum().backward()
    extra = {"ce_weight": None if cw is None else cw.float().to(device)}

    outs = {}
    env = os.environ.pop("MB_FUSED_KERNEL", None)  # the kernel argument chooses here
    for mode in ("triton", "torch"):
        u32, w32 = u.float().requires_grad_(), w.float().requires_grad_()
        b32 = None if b64 is None else b64.detach().float().requires_grad_()
        assert tk.should_use(u32, None, mode) == (mode == "triton")
        # statistics under a softcap or with class weights run the torch loop (d- / w-weighted sums): none there
        stats = HeadLossStats() if kw.get("softcap") is None and cw is None else None
        out = linear_cross_entropy(u32, w32, y, vocab_size=vocab, stats=stats, kernel=mode, chunk_size=chunk_size,
                                   bias=b32, **extra, **kw)
        (out * g.float()).sum().backward()
        outs[mode] = (out, u32.grad, w32.grad, None if stats is None else stats.sum_p2, None if b32 is None else b32.grad)
    if env is not None:
        os.environ["MB_FUSED_KERNEL"] = env
    out, du, dw, p2, db = outs["triton"]
    _close("loss", out, ref, 1e-5)
    _close("du", du, u64.grad, 1e-4)
    _close("dw", dw, w64.grad, 1e-4)
    assert bool((dw[vocab:] == 0).all()), "padding rows got a gradient"
    _close("loss vs torch", out, outs["torch"][0], 1e-5)
    _close("du vs torch", du, outs["torch"][1], 1e-4)
    _close("dw vs torch", dw, outs["torch"][2], 1e-4)
    if p2 is not None:
        _close("sum_p2 vs torch", p2, outs["torch"][3], 1e-4)
    if db is not None:
        _close("dbias", db, b64.grad, 1e-4)
        _close("dbias vs torch", db, outs["torch"][4], 1e-4)


def check_bf16_accuracy(device, t, k, v_rows, vocab, ignore_every=0, seed=0, **kw):
    """bf16 inputs, Zipfian labels, peaked logits: the op on the Triton path is at least as accurate
    against float64 (dL/dW of the 16 most frequent rows and whole, dL/du) as the unfused bf16 path."""
    u, w, y = peaked_zipf_problem(t, k, v_rows, vocab, alpha=10.0, ignore_every=ignore_every, seed=seed)
    u, w, y = u.to(device), w.to(device), y.to(device)
    n = int((y != -100).sum())
    grads = {}
    for name, dt in (("ref", torch.float64), ("unfused", torch.bfloat16), ("fused", torch.bfloat16)):
        uu, ww = u.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        if name == "fused":
            assert tk.should_use(uu, None, "triton")
            loss = linear_cross_entropy(uu, ww, y, vocab_size=vocab, kernel="triton", check_labels=False, **kw)
        else:
            loss = unfused_loss(uu, ww, y, vocab_size=vocab, **kw)
        (loss.double().sum() / n).backward()
        grads[name] = (uu.grad.cpu(), ww.grad.cpu())
    assert bool((grads["fused"][1][vocab:] == 0).all()), "padding rows got a gradient"
    fused = gradient_errors(grads["fused"], grads["ref"], y.cpu())
    unfused = gradient_errors(grads["unfused"], grads["ref"], y.cpu())
    for key in ("dw_top", "dw", "du"):
        assert fused[key] <= 1.1 * unfused[key] + 1e-6, f"{key}: fused {fused} vs unfused {unfused}"


CHUNK_CASES = [  # (dtype, T, k, V_rows, n_real, transposed u, backward chunk rows or None)
    (torch.float32, 50, 40, 300, 290, False, None),
    (torch.float32, 96, 24, 130, 130, True, 48),  # 3 chunks, the last one short
    (torch.float32, 20, 16, 40, 0, False, None),
    (torch.bfloat16, 50, 40, 200, 190, False, 70),  # a chunk (80 rows) not a multiple of the tile
    (torch.bfloat16, 37, 33, 100, 97, True, None),  # odd T, k, n_real
    (torch.float16, 33, 24, 150, 150, False, 64),
]
ACCURACY_CASES = [  # (T, k, V_rows, vocab, ignore_every, kwargs)
    (128, 32, 512, 512, 0, {}),
    (128, 32, 512, 512, 0, dict(softcap=5.0)),
    (128, 32, 520, 500, 5, dict(label_smoothing=0.1, z_loss_weight=1e-3)),
]
PUBLIC_CASES = [  # (T, k, V_rows, vocab, ignore_every, kwargs)
    (50, 24, 300, 300, 0, {}),
    (50, 40, 300, 280, 4, dict(label_smoothing=0.1, z_loss_weight=1e-3)),
    (64, 24, 140, 130, 3, dict(label_smoothing=0.2, chunk_size=48, bias=True)),  # 3 vocab chunks; a bias, stats
    # final-logit softcapping (Gemma), smoothing and z-loss on the capped logits; logits up to ~|10| reach the cap;
    # a bias (before the cap) and class weights (torch's smoothing convention: the weighted uniform term)
    (50, 24, 140, 130, 4, dict(softcap=3.0, label_smoothing=0.1, z_loss_weight=1e-3, chunk_size=48, bias=True,
                               ce_weight=True, smoothing_convention="torch")),
]


def run_all(device, chunk_cases=CHUNK_CASES, public_cases=PUBLIC_CASES, accuracy_cases=ACCURACY_CASES):
    os.environ["MB_FUSED_KERNEL"] = "triton"
    n = 0
    for dtype, t, k, v_rows, n_real, tr, chunk in chunk_cases:
        check_chunks(device, dtype, t, k, v_rows, n_real, tr, chunk)
        n += 1
    for t, k, v_rows, vocab, ign, kw in public_cases:
        check_public(device, t, k, v_rows, vocab, ign, **kw)
        n += 1
    for t, k, v_rows, vocab, ign, kw in accuracy_cases:
        check_bf16_accuracy(device, t, k, v_rows, vocab, ign, **kw)
        n += 1
    return n


if __name__ == "__main__":
    t0 = time.time()
    n = run_all(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(f"OK {n} checks in {time.time() - t0:.1f}s")
