"""One loss, written once (megatron_bottleneck.base.loss_spec): the fused op in the style of Liger-Kernel's and
cut-cross-entropy's tests (a matrix of shapes, options and reductions against torch's cross_entropy on float64
logits, dense and low-rank; 16-bit no worse than the unfused 16-bit path), the probe's G against autograd's
dL/dz for every built-in head and option (TP=1; TP=2 in tests/distributed/test_head_zoo.py), determinism of
the torch loop, and the one-line refusals. Small shapes: the whole file runs in well under a minute."""
import re

import pytest
import torch
import torch.nn.functional as F

import megatron_bottleneck as mb
from megatron_bottleneck.base.loss_spec import LossSpec
from megatron_bottleneck.ops import linear_cross_entropy
from megatron_bottleneck.ops.reference import flat_zipf_problem, peaked_zipf_problem
from tests import support, support_loss

# (T, k, V, labels): odd V, V not divisible by the chunk (16), T = 1, one non-ignored token, all ignored
SHAPES = {
    "odd V": (9, 8, 37, "random"),
    "T=1": (1, 8, 21, "random"),
    "one label": (7, 8, 19, "one"),
    "all ignored": (5, 8, 17, "none"),
}
OPTS = {
    "plain": {},
    "smoothing megatron": dict(label_smoothing=0.1),
    "smoothing torch": dict(label_smoothing=0.2, smoothing_convention="torch"),
    "z-loss": dict(z_loss_weight=1e-2),
    "softcap": dict(softcap=1.5),
    "ce_weight": dict(ce_weight="w"),
    "bias": dict(bias="b"),
    "all": dict(label_smoothing=0.1, smoothing_convention="torch", z_loss_weight=1e-2, softcap=1.5, ce_weight="w",
                bias="b"),
}


def _problem(shape, seed=0):
    t, k, v, kind = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, k, generator=gen, dtype=torch.float64)
    w = torch.randn(v, k, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v, (t,), generator=gen)
    if kind == "random" and t > 2:
        y[1] = -100
    elif kind == "one":
        y[:] = -100
        y[t // 2] = v - 1
    elif kind == "none":
        y[:] = -100
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.25
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    return h, w, y, cw, bias


def _torch_loss(a, y, opt, reduction, cw):
    """torch's cross_entropy (+ z-loss) of logits a (float64), Liger's semantics of every option."""
    v = a.shape[-1]
    x = opt["softcap"] * torch.tanh(a / opt["softcap"]) if opt.get("softcap") else a
    alpha = opt.get("label_smoothing", 0.0)
    eps = alpha if opt.get("smoothing_convention") == "torch" else alpha * v / (v - 1)
    w = cw if opt.get("ce_weight") else None
    loss = F.cross_entropy(x, y, weight=w, label_smoothing=eps, reduction=reduction)
    zl = torch.where(y != -100, opt.get("z_loss_weight", 0.0) * torch.logsumexp(x, -1) ** 2, 0.0)
    n = (y != -100).sum()
    z = {"none": zl, "sum": zl.sum(), "mean": zl.sum() / n}[reduction]
    return loss + z, z


@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low_rank"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("opt_name", list(OPTS))
def test_fused_op_matches_torch_cross_entropy_in_fp32(opt_name, shape, low_rank):
    """float32 op (chunks of 16 rows) against torch's cross_entropy on float64 logits, every reduction: loss,
    z-loss, dL/dh (through B for a low-rank head), dL/dW, dL/dbias to 1e-5 relative. "mean" divides by the
    non-ignored count (weighted: sum of w_y); all ignored: 0, where torch's mean gives NaN."""
    opt = OPTS[opt_name]
    h, w, y, cw, bias = _problem(shape)
    k = h.shape[1]
    gen = torch.Generator().manual_seed(1)
    b_mat = torch.randn(4, k, generator=gen, dtype=torch.float64) / 2 if low_rank else None
    all_ignored = bool((y == -100).all())
    for reduction in ("none", "sum", "mean"):
        leaves = {"h": h.clone(), "w": w.clone()}
        if low_rank:
            leaves["B"] = b_mat.clone()
        if opt.get("bias"):
            leaves["bias"] = bias.clone()
        outs = {}
        for dt in (torch.float32, torch.float64):
            p = {n: t.to(dt).requires_grad_(True) for n, t in leaves.items()}
            u = p["h"] @ p["B"].t() if low_rank else p["h"]
            f = p["w"][:, :4] if low_rank else p["w"]  # low rank: u = H B^T [T, 4], F = A [V, 4]
            if dt == torch.float32:
                kw = {key: val for key, val in opt.items() if key not in ("ce_weight", "bias")}
                loss, zl = linear_cross_entropy(u, f, y, reduction=reduction, return_z_loss=True, chunk_size=16,
                                                ce_weight=cw.float() if opt.get("ce_weight") else None,
                                                bias=p.get("bias"), **kw)
            else:
                a = u @ f.t() + (p["bias"] if "bias" in p else 0.0)
                loss, zl = _torch_loss(a, y, opt, reduction, cw)
                if all_ignored and reduction == "mean":
                    assert bool(torch.isnan(loss)), "torch's mean over no token is NaN"
                    loss, zl = (a * 0).sum(), (a * 0).sum()  # ours: 0, gradient 0
            wt = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
            (loss.double() * wt).sum().backward()
            outs[dt] = (loss.detach().double(), zl.detach().double(), {n: t.grad for n, t in p.items()})
        (l32, z32, g32), (l64, z64, g64) = outs[torch.float32], outs[torch.float64]
        where = f"{opt_name} {shape} {reduction}"
        assert l32.shape == l64.shape, where
        torch.testing.assert_close(l32, l64, rtol=1e-5, atol=1e-6, msg=where)
        torch.testing.assert_close(z32, z64, rtol=1e-5, atol=1e-7, msg=where)
        for n in g64:
            want = g64[n] if g64[n] is not None else torch.zeros_like(leaves[n])
            scale = float(want.abs().max().clamp(min=1e-6))
            err = float((g32[n].double() - want).abs().max()) / scale
            assert err < 1e-5, f"{where} d{n}: {err:.2e}"


def _unfused16(u, w, y, opt, cw):
    """The unfused 16-bit path: logits from a 16-bit GEMM, then float32 cross-entropy with the options."""
    a = (u @ w.t()).float()
    return _torch_loss(a, y, opt, "none", cw.float() if opt.get("ce_weight") else None)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("problem", ["peaked", "flat"])
def test_16bit_no_worse_than_the_unfused_16bit_path(dtype, problem):
    """bf16 / fp16 inputs, Zipfian labels, peaked (trained-like) and flat logits, every option at once: the op's
    loss, dL/du and dL/dW against float64 are within 1.1x the unfused 16-bit path's errors."""
    make = peaked_zipf_problem if problem == "peaked" else flat_zipf_problem
    u, w, y = make(96, 32, 200, 190, ignore_every=7, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    cw = torch.rand(190, generator=gen, dtype=torch.float64) + 0.5
    opt = dict(label_smoothing=0.1, z_loss_weight=1e-3, softcap=15.0, ce_weight=True)
    res = {}
    for name in ("ref", "unfused", "fused"):
        dt = torch.float64 if name == "ref" else dtype
        uu, ww = u.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        if name == "fused":
            kw = {key: val for key, val in opt.items() if key != "ce_weight"}
            loss = linear_cross_entropy(uu, ww, y, vocab_size=190, ce_weight=cw.float(), chunk_size=64, **kw)
        elif name == "ref":
            a = uu @ ww[:190].t()
            loss = _torch_loss(a, y, opt, "none", cw)[0]
        else:
            loss = _unfused16(uu, ww[:190], y, opt, cw)
        loss.double().sum().backward()
        res[name] = (loss.detach().double(), uu.grad.double(), ww.grad.double()[:190])

    def err(i, name):
        return float((res[name][i] - res["ref"][i]).norm() / res["ref"][i].norm())

    for i, what in enumerate(("loss", "du", "dw")):
        assert err(i, "fused") <= 1.1 * err(i, "unfused") + 1e-7, (what, err(i, "fused"), err(i, "unfused"))


def test_torch_loop_is_bitwise_reproducible():
    """Two runs of the same call (every option, 3 vocab chunks): loss, z-loss and gradients bitwise equal (no
    atomics, fixed summation orders; the Triton kernels use none either, see triton_lce_checks)."""
    h, w, y, cw, bias = _problem("odd V")
    outs = []
    for _ in range(2):
        u, f, b = (t.float().requires_grad_(True) for t in (h, w, bias))
        loss, zl = linear_cross_entropy(u, f, y, label_smoothing=0.1, z_loss_weight=1e-2, softcap=2.0,
                                        ce_weight=cw.float(), bias=b, chunk_size=16, return_z_loss=True)
        (loss * torch.arange(loss.numel())).sum().backward()
        outs.append([loss.detach(), zl.detach(), u.grad, f.grad, b.grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_loss_mean_of_per_token_output_counts_ignored_tokens():
    """loss.mean() of reduction="none" divides by every token; reduction="mean" by the non-ignored ones."""
    h, w, y, _, _ = _problem("odd V")
    per_token = linear_cross_entropy(h.float(), w.float(), y)
    mean = linear_cross_entropy(h.float(), w.float(), y, reduction="mean")
    n, t = int((y != -100).sum()), y.numel()
    torch.testing.assert_close(per_token.mean() * t / n, mean)


@pytest.mark.parametrize("make,pattern", [
    (lambda: LossSpec(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\), got 1.0"),
    (lambda: LossSpec(smoothing_convention="liger"), r"smoothing_convention must be 'megatron'"),
    (lambda: LossSpec(softcap=0.0), r"softcap must be a positive number or None"),
    (lambda: LossSpec(reduction="avg"), r"reduction must be 'none', 'sum' or 'mean', got 'avg'"),
    (lambda: LossSpec(ce_weight=(1.0, -1.0)), r"ce_weight must hold finite non-negative class weights"),
    (lambda: LossSpec(z_loss_weight=-1), r"z_loss_weight must be >= 0"),
    (lambda: mb.heads.FusedLossConfig(softcap=-2), r"softcap must be a positive number"),
    (lambda: mb.heads.FusedLossConfig(reduction="avg"), r"reduction must be 'none', 'sum' or 'mean', got 'avg'"),
    (lambda: mb.heads.FusedLossConfig(return_z_loss="yes"), r"return_z_loss must be True or False, got 'yes'"),
    (lambda: mb.heads.FusedLossConfig(reduction="mean").check_model_path(), r"reduction='mean' in a model: its "
                                                                            r"forward returns the per-token loss"),
    (lambda: mb.heads.FusedLossConfig(return_z_loss=True).check_model_path(), r"return_z_loss=True in a model"),
    (lambda: mb.heads.FusedLossConfig(ce_weight=(1.0, 2.0)).check_model_path(5), r"ce_weight has 2 class weights, "
                                                                                  r"the model's vocabulary 5"),
    (lambda: linear_cross_entropy(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long),
                                  ce_weight=torch.ones(4)), r"ce_weight has 4 entries, the vocabulary 5"),
    (lambda: linear_cross_entropy(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long),
                                  ce_weight=-torch.ones(5)), r"ce_weight holds negative class weights"),
    (lambda: linear_cross_entropy(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long),
                                  bias=torch.zeros(4)), r"bias must be \[V_local\] = \[5\]"),
])
def test_bad_loss_options_are_one_line_errors(make, pattern):
    """LossSpec / FusedLossConfig raise ConfigError, the op ValueError (as its other checks): one line each."""
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_smoothing_conventions_differ_by_v_over_v_minus_1():
    """megatron: eps = alpha V / (V - 1) (1 - alpha on the label); torch: eps = alpha."""
    assert LossSpec(label_smoothing=0.1).smoothing(11) == pytest.approx(0.11)
    assert LossSpec(label_smoothing=0.1, smoothing_convention="torch").smoothing(11) == pytest.approx(0.1)
    a = torch.randn(4, 11, dtype=torch.float64)
    y = torch.tensor([0, 3, 10, 5])
    p_mega = (1 - 0.11) * F.one_hot(y, 11).double() + 0.11 / 11  # the target distribution of Megatron's smoothing
    assert torch.allclose(p_mega.max(1).values, torch.full((4,), 0.9, dtype=torch.float64))
    got = linear_cross_entropy(a, torch.eye(11, dtype=torch.float64), y, label_smoothing=0.1)
    torch.testing.assert_close(got.double(), -(p_mega * torch.log_softmax(a, -1)).sum(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("megatron_one_rank")
def test_probe_grad_equals_autograd_for_every_head_and_option_tp1():
    """Every built-in head x every LossSpec option at TP=1: the probe's G (linear heads: from the fused record,
    and its per-token norms from HeadLossStats; non-linear heads: the general probe's) equals autograd's dL/dz
    of the float64 loss the head trains on; refused combinations are one-line HeadConfigErrors."""
    checks, refusals = support_loss.check_probe_grads()
    assert len(checks) > 100
    for label, got, want in checks:
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-5, atol=2e-6, msg=label)
    refused = {label.split(" m=")[0] for label, _ in refusals}
    assert "sigsoftmax softcap" in refused and "mos:k=3 ce_weight" in refused and "dense softcap" not in refused
    assert {"decoupled:width=12 z-loss", "stacked:width=12,activation=tanh z-loss"}.isdisjoint(refused)
    assert any(label.startswith("decoupled:width=12 z-loss m=0.5") for label, _, _ in checks)
    for label, message in refusals:
        assert "\n" not in message and message, label
        if "softcap" in label.split()[1:]:
            assert "final-logit softcapping" in message, (label, message)


def test_every_option_makes_no_host_sync():
    """Softcap, class weights, bias, torch's smoothing, z-loss, statistics and the "mean" reduction: forward and
    backward without one host synchronisation (aten._local_scalar_dense: item(), bool(tensor))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))

    h, w, y, cw, bias = _problem("odd V")
    u, f, b = (t.float().requires_grad_(True) for t in (h, w, bias))
    spec = LossSpec(label_smoothing=0.1, smoothing_convention="torch", z_loss_weight=1e-2, softcap=2.0,
                    ce_weight=tuple(cw.tolist()), reduction="mean")
    with CountSyncs():
        loss = linear_cross_entropy(u, f, y, loss_spec=spec, bias=b, chunk_size=16, check_labels=False,
                                    stats=mb.HeadLossStats())
        loss.backward()
    assert CountSyncs.syncs == 0 and u.grad is not None and b.grad is not None
    assert len(spec._weights) == 1  # the tuple became a tensor once, kept for the next call
