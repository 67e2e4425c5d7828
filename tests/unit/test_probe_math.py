"""The probe's math (probe.stats, probe.spectrum) against brute-force float64 references, one process."""
import math

import pytest
import torch

from megatron_bottleneck.base.head import HeadView
from megatron_bottleneck.probe import GramAccumulator, StepAccumulator


def logit_grad(t, v, seed=0, temp=3.0):
    """Rows softmax(z) - onehot(y), divided by T: a realistic mean cross-entropy gradient."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(t, v, generator=g, dtype=torch.float64) * temp
    y = torch.randint(0, v, (t,), generator=g)
    return (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, v)) / t


def brute(G, W):
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    r = int((S > S[0] * max(W.shape) * 1e-12).sum())
    vis = G @ U[:, :r] @ U[:, :r].t()
    return {"destroyed_ratio": ((G - vis).norm() / G.norm()).item(),
            "visible_cosine": (vis.norm() / G.norm()).item(),
            "hidden_grad_norm": (G @ W).norm().item(), "grad_norm": G.norm().item(), "rank": r}


def figures(G, basis, mix=None, vocab=None, update=False, H=None, micro=1, dtype=torch.float32):
    acc = StepAccumulator(update=update)
    view = HeadView(basis.float(), None if mix is None else mix.float(), 0, vocab or basis.shape[0])
    W = basis if mix is None else basis @ mix
    for gs, hs in zip(G.chunk(micro), (H.chunk(micro) if H is not None else [None] * micro)):
        acc.add_logit_grad(gs.to(dtype), view, None if hs is None else hs.float())
        acc.add_hidden_grad((gs.double() @ W).to(dtype), None if hs is None else hs.float())
    return acc.finalize()


@pytest.mark.parametrize("rank", [None, 12, 3])
def test_cheap_figures_match_bruteforce(rank):
    T, V, D = 48, 200, 24
    G = logit_grad(T, V)
    gen = torch.Generator().manual_seed(1)
    if rank is None:
        W = torch.randn(V, D, generator=gen, dtype=torch.float64)
        got = figures(G, W)
    else:
        A = torch.randn(V, rank, generator=gen, dtype=torch.float64)
        B = torch.randn(rank, D, generator=gen, dtype=torch.float64)
        W = A @ B
        got = figures(G, A, B)
    want = brute(G, W)
    for key in ("destroyed_ratio", "visible_cosine", "hidden_grad_norm", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["head_rank"] == want["rank"]
    assert got["isotropic_baseline"] == pytest.approx(math.sqrt(1 - want["rank"] / (V - 1)))


def test_update_cosine_matches_explicit_dz_over_microbatches():
    T, V, D = 32, 90, 10
    G = logit_grad(T, V, seed=3)
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64)
    H = torch.randn(T, D, generator=gen, dtype=torch.float64)
    got = figures(G, W, update=True, H=H, micro=4)
    dZ = G @ W @ W.t() + H @ (H.t() @ G)  # full-step P = H^T G
    want = ((G * dZ).sum() / (G.norm() * dZ.norm())).item()
    assert got["update_cosine"] == pytest.approx(want, rel=1e-5)


def test_padded_vocabulary_is_excluded():
    T, V, D, real = 20, 64, 8, 57
    G = logit_grad(T, V, seed=5)
    W = torch.randn(V, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = figures(G, W, vocab=real)
    want = brute(G[:, :real], W[:real])
    assert got["destroyed_ratio"] == pytest.approx(want["destroyed_ratio"], rel=1e-5)
    assert got["hidden_grad_norm"] == pytest.approx(want["hidden_grad_norm"], rel=1e-5)


@pytest.mark.parametrize("case", ["padded", "rank_deficient_mix", "micro_batches"])
def test_low_rank_head_reduced_hidden_gram_matches_bruteforce(case):
    """A low-rank head keeps dH^T dH as the r x r Q^T K Q (Q a basis of row(B)): the figures must still equal
    the brute-force ones, with a padded vocabulary (dH corrected by G_pad W_pad), over micro-batches, and for a
    B whose rows are linearly dependent (the pseudo-inverse fallback)."""
    T, V, D, r = 48, 120, 20, 6
    G = logit_grad(T, V, seed=21)
    gen = torch.Generator().manual_seed(22)
    A = torch.randn(V, r, generator=gen, dtype=torch.float64)
    B = torch.randn(r, D, generator=gen, dtype=torch.float64)
    vocab, micro = V, 1
    if case == "padded":
        vocab = 111
    elif case == "rank_deficient_mix":
        B[-1] = B[0] + B[1]  # rank(W) = r - 1
    else:
        micro = 4
    acc_probe = StepAccumulator()
    view = HeadView(A.float(), B.float(), 0, vocab)
    for gs in G.chunk(micro):
        acc_probe.add_logit_grad(gs.float(), view)
        acc_probe.add_hidden_grad((gs @ A @ B).float())
    assert acc_probe.k is None and acc_probe.k_red.shape == (r, r)  # the reduced path was taken
    got = acc_probe.finalize()
    want = brute(G[:, :vocab], (A @ B)[:vocab])
    for key in ("destroyed_ratio", "visible_cosine", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["hidden_grad_norm"] == pytest.approx(want["hidden_grad_norm"], rel=1e-5)
    assert got["head_rank"] == want["rank"]


def test_limits_full_rank_head_and_rank_one_head():
    T, V = 30, 16
    G = logit_grad(T, V, seed=7)
    W = torch.randn(V, V - 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # D >= V - 1: rows of G sum to zero, so col(W) (generic, dim V-1) ... plus the all-ones direction:
    # with D = V the head sees everything.
    full = figures(G, torch.randn(V, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    assert full["destroyed_ratio"] < 1e-3
    one = figures(G, W[:, :1])
    assert one["destroyed_ratio"] > 0.9


def test_destroyed_ratio_grows_as_head_rank_shrinks():
    T, V, D = 64, 300, 32
    G = logit_grad(T, V, seed=10)
    gen = torch.Generator().manual_seed(11)
    A = torch.randn(V, D, generator=gen, dtype=torch.float64)
    B = torch.randn(D, D, generator=gen, dtype=torch.float64)
    ratios = [figures(G, A[:, :r], B[:r])["destroyed_ratio"] for r in (32, 16, 8, 4, 1)]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]


def test_bf16_gradients_accumulate_accurately():
    T, V, D = 40, 128, 16
    G = logit_grad(T, V, seed=12).to(torch.bfloat16).double()
    W = torch.randn(V, D, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    got = figures(G, W, dtype=torch.bfloat16)
    assert got["destroyed_ratio"] == pytest.approx(brute(G, W)["destroyed_ratio"], rel=1e-4)


def test_nonfinite_gradient_is_reported():
    G = logit_grad(8, 20, seed=14)
    G[3, 5] = float("nan")
    got = figures(G, torch.randn(20, 4, dtype=torch.float64))
    assert got["nonfinite_grad"] == 1.0 and math.isnan(got["destroyed_ratio"])


def test_rank_figures_and_curve_match_svd():
    T, V, D = 64, 40, 6
    G = logit_grad(T, V, seed=15)
    gram = GramAccumulator(token_budget=48)
    view = HeadView(torch.zeros(V, 1), None, 0, V)
    for part in G.float().chunk(4):  # 16 rows each; the budget stops after 48
        gram.add(part, view)
    assert gram.full
    out = gram.finalize(residual_ranks=(2 * D,), energy_ks=(1, 5))
    Gb = G[:48].float().double()
    s = torch.linalg.svdvals(Gb)
    tol = s[0] * max(48, V) * torch.finfo(torch.float32).eps
    assert out["numerical_rank"] == int((s > tol).sum()) == V - 1  # rows sum to zero: rank <= V-1
    p = s / s.sum()
    assert out["effective_rank"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-6)
    assert out["energy_top5"] == pytest.approx((s[:5] ** 2).sum().item() / (s ** 2).sum().item(), rel=1e-6)
    assert out[f"eym_residual_rank{2 * D}"] == pytest.approx(
        math.sqrt((s[2 * D:] ** 2).sum().item() / (s ** 2).sum().item()), rel=1e-6)
    for point in out["rank_curve"]:
        sv = torch.linalg.svdvals(Gb[: point["tokens"]])
        tol = sv[0] * max(point["tokens"], V) * torch.finfo(torch.float32).eps
        assert point["numerical_rank"] == int((sv > tol).sum())
    assert out["rank_curve"][-1]["tokens"] == 48


def test_position_buckets_and_degenerate_factors():
    T, V, D, s, b = 32, 80, 8, 8, 4  # tokens ordered [s, b]
    G = logit_grad(T, V, seed=30)
    gen = torch.Generator().manual_seed(31)
    A = torch.randn(V, 3, generator=gen, dtype=torch.float64)
    B = torch.randn(3, D, generator=gen, dtype=torch.float64)
    B[2] = B[0]  # M without full row rank: the exact fallback must take over
    W = A @ B
    acc = StepAccumulator(num_buckets=2)
    view = HeadView(A.float(), B.float(), 0, V)
    acc.add_logit_grad(G.float().reshape(s, b, V), view)
    acc.add_hidden_grad((G @ W).float().reshape(s, b, D))
    got = acc.finalize()
    assert got["destroyed_ratio"] == pytest.approx(brute(G, W)["destroyed_ratio"], rel=1e-5)
    assert got["head_rank"] == 2
    rows = torch.arange(T) // b  # sequence position of each token
    for i, part in enumerate((rows < 4, rows >= 4)):
        assert got[f"destroyed_ratio_bucket{i}"] == pytest.approx(brute(G[part], W)["destroyed_ratio"], rel=1e-5)


def test_bf16_gradients_get_a_usable_rank_tolerance():
    G = logit_grad(64, 500, seed=40).to(torch.bfloat16)
    gram = GramAccumulator(token_budget=64)
    gram.add(G, HeadView(torch.zeros(500, 1), None, 0, 500))
    out = gram.finalize()
    s = torch.linalg.svdvals(G.double())
    tol = s[0] * 500 * torch.finfo(torch.float32).eps
    assert out["numerical_rank"] == int((s > tol).sum()) > 32
