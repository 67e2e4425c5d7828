"""The probe's math for any head (probe.general): batched conjugate gradients on the centred per-token Gram
M_t = J_t^T C J_t against brute force (float64 SVD of each token's centred Jacobian), a monotone lower bound on
the visible energy at every iteration, and the closed form of probe.stats for a linear head."""
import math

import pytest
import torch

from megatron_bottleneck.base.head import HeadView
from megatron_bottleneck.probe import StepAccumulator
from megatron_bottleneck.probe.general import centred_gram_matvec, visible_energy_cg

T, V, D = 40, 96, 12


def _zipf_logit_grad(gen, t, v):
    """softmax(z) - onehot(y) with Zipfian labels and peaked logits (what a trained LM gives)."""
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    y = torch.multinomial(1.0 / ranks, t, replacement=True, generator=gen)
    z = torch.randn(t, v, generator=gen, dtype=torch.float64) * 2.0 - 1.5 * torch.log(ranks)
    z[torch.arange(t), y] += 3.0
    return torch.softmax(z, -1) - torch.nn.functional.one_hot(y, v).double()


def _jacobians(gen, rank_deficient):
    """Per-token J_t (V x D): a shared head weight reweighted per token (as sigsoftmax's diag(1 - s(z)) W), and
    for some tokens of rank < D (as a head whose window collapses)."""
    w = torch.randn(V, D, generator=gen, dtype=torch.float64)
    scale = torch.rand(T, V, 1, generator=gen, dtype=torch.float64) + 0.05
    j = scale * w
    if rank_deficient:
        low = torch.randn(T, V, 3, generator=gen, dtype=torch.float64) @ torch.randn(T, 3, D, generator=gen,
                                                                                     dtype=torch.float64)
        j[::3] = low[::3]
    return j


def _brute_visible(j, g, centred=True):
    """||P_t g_t||^2 with P_t the orthogonal projection on col(C J_t), from an SVD (float64)."""
    out = []
    c = torch.eye(V, dtype=torch.float64) - 1.0 / V if centred else torch.eye(V, dtype=torch.float64)
    for jt, gt in zip(j, g):
        u, s, _ = torch.linalg.svd(c @ jt, full_matrices=False)
        r = int((s > s[0] * V * 1e-12).sum())
        out.append(((u[:, :r].t() @ gt) ** 2).sum())
    return torch.stack(out)


def _matvec(j, shards=1, centred=True):
    """M v through per-shard JVPs, the vocabulary split in ``shards`` (a TP group's ranks): each shard's JVP
    gives its columns, the VJP the sum over every shard's columns (as HeadLogProb's VJP does)."""
    parts = torch.tensor_split(torch.arange(V), shards)

    def matvec(v):
        jv = [torch.einsum("tvd,td->tv", j[:, idx], v) for idx in parts]
        total = sum(x.sum(-1, keepdim=True) for x in jv)  # what the all-reduce of the column sums gives
        held = {}

        def vjp(w, idx):
            held[idx[0].item()] = torch.einsum("tvd,tv->td", j[:, idx], w)
            return held[idx[0].item()]

        for idx, x in zip(parts, jv):
            centred_gram_matvec(lambda _v, x=x: x, lambda w, idx=idx: vjp(w, idx), V, vocab_sum=lambda t: total,
                                centred=centred)(v)
        return sum(held.values())  # the VJP's sum over shards

    return matvec


@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("shards", [1, 2])
def test_cg_equals_bruteforce_and_rises_monotonically(rank_deficient, shards):
    gen = torch.Generator().manual_seed(3 + shards)
    j = _jacobians(gen, rank_deficient)
    g = _zipf_logit_grad(gen, T, V)
    dh = torch.einsum("tvd,tv->td", j, g)
    exact = _brute_visible(j, g)
    res = visible_energy_cg(_matvec(j, shards), dh, iterations=2 * D)
    assert torch.allclose(res.visible, exact, rtol=1e-8, atol=1e-12)
    assert float(res.residual.max()) < 1e-6
    hist = res.history.tolist()
    assert all(b >= a - 1e-12 * abs(b) for a, b in zip(hist, hist[1:]))  # non-decreasing
    assert all(h <= float(exact.sum()) * (1 + 1e-10) for h in hist)  # every iterate a lower bound
    early = visible_energy_cg(_matvec(j, shards), dh, iterations=3)
    assert early.iterations == 3 and bool((early.visible <= exact * (1 + 1e-9) + 1e-15).all())
    destroyed_early = math.sqrt(1 - float(early.visible.sum()) / float((g ** 2).sum()))
    destroyed = math.sqrt(1 - float(exact.sum()) / float((g ** 2).sum()))
    assert destroyed_early >= destroyed  # the reported destroyed ratio is an upper bound at any iteration


def test_linear_head_through_the_general_path_equals_the_closed_form():
    """J_t = W for every token: the uncentred general path gives probe.stats' figures; centring changes the
    visible energy by at most one dimension's worth (brute force, centred)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(V, D, generator=gen, dtype=torch.float64)
    g = _zipf_logit_grad(gen, T, V) / T
    dh = g @ w
    acc = StepAccumulator()
    view = HeadView(w.float(), None, 0, V)
    acc.add_logit_grad(g.float(), view)
    acc.add_hidden_grad(dh.float())
    closed = acc.finalize()
    plain = visible_energy_cg(centred_gram_matvec(lambda v: v @ w.t(), lambda u: u @ w, V, centred=False), dh,
                              iterations=2 * D)
    destroyed = math.sqrt(1 - float(plain.visible.sum()) / float((g ** 2).sum()))
    assert destroyed == pytest.approx(closed["destroyed_ratio"], rel=1e-5)
    centred = visible_energy_cg(centred_gram_matvec(lambda v: v @ w.t(), lambda u: u @ w, V), dh, iterations=2 * D)
    exact_centred = _brute_visible(w.expand(T, V, D), g)
    assert torch.allclose(centred.visible, exact_centred, rtol=1e-8, atol=1e-14)


def test_a_token_with_no_gradient_and_a_bfloat16_input_stay_finite():
    gen = torch.Generator().manual_seed(1)
    j = _jacobians(gen, False)
    g = _zipf_logit_grad(gen, T, V)
    g[5] = 0.0
    dh = torch.einsum("tvd,tv->td", j, g)
    exact = _brute_visible(j, g)
    res = visible_energy_cg(lambda v: _matvec(j)(v.double()).to(v.dtype), dh.bfloat16(), iterations=2 * D)
    assert res.visible.dtype == torch.float64 and bool(torch.isfinite(res.visible).all())
    assert float(res.visible[5]) == 0.0 and float(res.residual[5]) == 0.0
    # bf16 inputs (dh and the matvec's operand): the batch's visible energy within bf16's resolution
    assert float(res.visible.sum()) == pytest.approx(float(exact.sum()), rel=3e-2)


class _SigsoftmaxLogProb:
    """A HeadLogProb-shaped function (one process): u = log_softmax(z + log sigmoid(z)), z = h W^T."""

    def __init__(self, w):
        self.params, self.sharded, self.vocab_start, self.vocab_size, self.n_valid = {"weight": w}, frozenset(), 0, \
            w.shape[0], w.shape[0]
        self.tp_group = None

    @staticmethod
    def fn(params, h):
        z = h @ params["weight"].t()
        return torch.log_softmax(z + torch.nn.functional.logsigmoid(z), -1)


def test_head_figures_of_a_nonlinear_head_equal_the_full_jacobian():
    """destroyed ratio and update cosine of a sigsoftmax head from head_figures (JVP/VJP, CG) against the full
    per-token Jacobians by autograd (float64): SVD of each centred J_t, and dU = J_h dh + J_W dW built
    from them."""
    from megatron_bottleneck.probe.general import head_figures

    gen = torch.Generator().manual_seed(7)
    t, v, d = 10, 30, 6
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    h = torch.randn(t, d, generator=gen, dtype=torch.float64) * 2
    ranks = torch.arange(1, v + 1, dtype=torch.float64)
    y = torch.multinomial(1.0 / ranks, t, replacement=True, generator=gen)
    head = _SigsoftmaxLogProb(w)
    got = head_figures(head, h, y, update=True)

    fn = _SigsoftmaxLogProb.fn
    p = fn({"weight": w}, h).exp()
    g = p - torch.nn.functional.one_hot(y, v).double()
    c = torch.eye(v, dtype=torch.float64) - 1.0 / v
    vis, du = 0.0, []
    dw = torch.autograd.functional.vjp(lambda ww: fn({"weight": ww}, h), w, g)[1]
    for i in range(t):
        j_h = torch.autograd.functional.jacobian(lambda x: fn({"weight": w}, x[None])[0], h[i])  # V x D
        u_, s_, _ = torch.linalg.svd(c @ j_h, full_matrices=False)
        r = int((s_ > s_[0] * v * 1e-12).sum())
        vis += float(((u_[:, :r].t() @ g[i]) ** 2).sum())
        j_w = torch.autograd.functional.jacobian(lambda ww: fn({"weight": ww}, h[i:i + 1])[0], w)  # V x V x D
        du.append(j_h @ (j_h.t() @ g[i]) + torch.einsum("avd,vd->a", j_w, dw))
    g2 = float((g ** 2).sum())
    assert float(got["destroyed_ratio"]) == pytest.approx(math.sqrt(1 - vis / g2), rel=1e-9)
    assert float(got["grad_norm"]) == pytest.approx(math.sqrt(g2), rel=1e-12)
    du = torch.stack(du) @ c
    cos = float((g * du).sum() / (g.norm() * du.norm()))
    assert float(got["update_cosine"]) == pytest.approx(cos, rel=1e-9)
    assert float(got["cg_residual"]) < 1e-8
