"""The probe's logit gradient G against autograd's dL/dz of the loss each built-in head trains on, for every
LossSpec option, on whatever TP layout Megatron's parallel state has (tests/unit/test_loss_spec.py at TP=1, the
spawn of tests/distributed/test_head_zoo.py at TP=2: every option in that one spawn).

The reference is written here again in float64 from the full (all-gathered) parameters, with torch's own
cross-entropy: loss_t = F.cross_entropy(x, y, weight=w, label_smoothing=eps, reduction="none") + zeta lse(x)^2,
x = c tanh(m z / c) (m: MuP's multiplier, c: the softcap), eps = alpha V / (V - 1) ("megatron") or alpha
("torch"), z the head's logits: h W^T (dense), h B^T A^T (low_rank), and for the non-linear heads their
log-probabilities u (whose cross-entropy is the head's loss, as Megatron's cross-entropy of the unfused output).
G (this rank's columns) must equal dL/dz for L = sum_t g_t loss_t:

* linear heads, fused: what GradientProbe computes from the head's record (``logit_grad_rows`` with the
  record's LossSpec, grad_out = m g) and ||G_t||^2 from ``HeadLossStats.logit_grad_sq_norm(m g)``;
* non-linear heads: ``probe.general.logit_grad`` of the head's ``log_prob_fn`` output with the config's LossSpec.

Options a head cannot honour must be refused in one line (HeadConfigError).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

import megatron_bottleneck as mb
from tests import support_heads as sh

W_CLASS = tuple(0.5 + (i % 7) / 7.0 for i in range(sh.V_REAL))
OPTIONS = {
    "plain": {},
    "smoothing megatron": dict(label_smoothing=0.1),
    "smoothing torch": dict(label_smoothing=0.1, smoothing_convention="torch"),
    "z-loss": dict(z_loss_weight=0.02),
    "softcap": dict(softcap=2.0),
    "ce_weight": dict(ce_weight=W_CLASS),
    "all": dict(label_smoothing=0.1, smoothing_convention="torch", z_loss_weight=0.02, softcap=2.0, ce_weight=W_CLASS),
}
MUP = 0.5  # a MuP output multiplier, with the options that allow it (no softcap)
LINEAR = ["dense", "low_rank:r=4", "dense+bias"]  # dense+bias: a ColumnParallelLinear with bias=True as the head


def reference_loss(x_in: torch.Tensor, y: torch.Tensor, opt: dict, m: float = 1.0) -> torch.Tensor:
    """float64 per-token loss of logits x_in [T, V] (see the module docstring), with torch's cross-entropy."""
    v = x_in.shape[-1]
    x = m * x_in
    if opt.get("softcap"):
        x = opt["softcap"] * torch.tanh(x / opt["softcap"])
    alpha = opt.get("label_smoothing", 0.0)
    eps = alpha if opt.get("smoothing_convention") == "torch" else alpha * v / (v - 1)
    w = None if opt.get("ce_weight") is None else torch.tensor(opt["ce_weight"], dtype=x.dtype)
    loss = F.cross_entropy(x, y, weight=w, label_smoothing=eps, reduction="none", ignore_index=-100)
    if opt.get("z_loss_weight"):
        loss = loss + opt["z_loss_weight"] * torch.where(y != -100, torch.logsumexp(x, -1) ** 2, 0.0)
    return loss


def _build(kind: str, tp: int):
    if kind != "dense+bias":
        return sh.build(kind, tp, False)
    from megatron.core.tensor_parallel import ColumnParallelLinear

    cfg = sh.head_config(tp, False)
    layer = ColumnParallelLinear(sh.D, sh.V_PAD, config=cfg, init_method=cfg.init_method, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(5)))
    return mb.heads.as_lm_head(layer, sh.V_REAL)


def _ref_logits(kind: str, p, h):
    w = p["weight"][:sh.V_REAL]
    if kind == "dense+bias":
        return h @ w.t() + p["bias"][:sh.V_REAL]
    if kind.startswith("dense"):
        return h @ w.t()
    if kind.startswith("low_rank"):
        return (h @ p["input_proj"].t()) @ w.t()
    if kind.startswith("stacked"):  # the loss is the cross-entropy of its logits z = W act(P h) (z-loss on lse(z))
        return torch.tanh(h @ p["proj"].t()) @ w.t()
    if kind.startswith("decoupled"):
        return (h @ p["proj"].t()) @ w.t()
    return sh.reference_log_probs(kind, p, h)


def _refusal(fn) -> str:
    try:
        fn()
    except mb.base.HeadConfigError as exc:
        return str(exc)
    return ""


def check_probe_grads() -> Tuple[List[Tuple[str, torch.Tensor, torch.Tensor]], List[Tuple[str, str]]]:
    """(checks, refusals): (label, got, want) pairs and (label, one-line message) for every built-in head x option
    on the current TP layout."""
    from megatron_bottleneck.heads import FusedLossConfig
    from megatron_bottleneck.ops import logit_grad_rows
    from megatron_bottleneck.probe.general import logit_grad

    group, tp, rank = sh._tp()
    h, y, _, _ = sh._inputs()
    yy = y.reshape(-1)
    gen = torch.Generator().manual_seed(8)
    g = torch.rand(yy.shape[0], generator=gen, dtype=torch.float64) + 0.5  # dL/dloss_t
    checks, refusals = [], []
    for kind in LINEAR + sh.KINDS:
        linear = kind in LINEAR
        head = _build(kind, tp)
        p = sh._full_params(head, group, tp)
        if kind == "dense+bias":  # the bias is sharded over the vocabulary as the weight
            p["bias"] = sh._gather0(head.bias, group, tp).double()
        for name, opt in OPTIONS.items():
            scales = (1.0, MUP) if linear and not opt.get("softcap") else (1.0,)
            if kind.startswith(("stacked", "decoupled")) and not opt.get("softcap") and name in ("plain", "z-loss"):
                scales = (1.0, MUP)
            for m in scales:
                label = f"{kind} {name} m={m} tp={tp}"
                cfg = FusedLossConfig(**opt)
                stats = mb.HeadLossStats() if linear else None
                why = _refusal(lambda: head.loss(h, y, config=cfg, stats=stats, logit_scale=m))
                if why:
                    refusals.append((label, why))
                    continue
                loss = head.loss(h, y, config=cfg, stats=stats, logit_scale=m)
                hh = h.double().reshape(-1, sh.D)
                z = _ref_logits(kind, p, hh).detach().requires_grad_(True)
                ref = reference_loss(z, yy, opt, m)
                (ref * g).sum().backward()
                checks.append((f"{label} loss", loss.reshape(-1).double(), ref.detach()))
                if m == 1.0 and name in ("z-loss", "all"):  # config.reduction / return_z_loss (head.loss)
                    checks += _reduced_checks(head, h, y, cfg, z.detach(), opt, label)
                if linear:
                    rec = head.last_loss
                    st = rec.stats
                    n_valid = max(0, min(rec.weight.shape[0], rec.vocab_size - rec.vocab_start))
                    got = logit_grad_rows(rec.input.reshape(-1, rec.input.shape[-1]), rec.weight,
                                          rec.labels.reshape(-1), st.lse.reshape(-1), (g * rec.logit_scale).float(),
                                          vocab_start=rec.vocab_start, vocab_size=rec.vocab_size,
                                          loss_spec=st.loss_spec(), bias=rec.bias)
                    checks.append((f"{label} G padding", got[:, n_valid:], torch.zeros_like(got[:, n_valid:])))
                    checks.append((f"{label} G", got[:, :n_valid].double(),
                                   z.grad[:, rec.vocab_start:rec.vocab_start + n_valid]))
                    norms = st.logit_grad_sq_norm((g * rec.logit_scale).reshape(st.lse.shape)).reshape(-1)
                    checks.append((f"{label} ||G_t||^2", norms, z.grad.square().sum(-1)))
                else:
                    lp = head.log_prob_fn()
                    logits = lp.logits_fn is not None  # stacked / decoupled: G at their logits, z-loss included
                    u = (lp.logits_fn if logits else lp.fn)(lp.params, h.reshape(-1, sh.D))
                    got = logit_grad(u, yy, lp.vocab_start, lp.n_valid, lp.vocab_size, scale=g, logit_scale=m,
                                     tp_group=lp.tp_group, loss_spec=cfg.loss_spec(), logits=logits)
                    checks.append((f"{label} G", got, z.grad[:, lp.vocab_start:lp.vocab_start + lp.n_valid]))
    return checks, refusals


def _reduced_checks(head, h, y, cfg, z, opt, label):
    """head.loss with FusedLossConfig(reduction=..., return_z_loss=True) against the float64 reference: the
    (loss, z-loss) pair, "sum" and "mean" (the weighted mean's denominator sum_t w_{y_t})."""
    from dataclasses import replace

    yy = y.reshape(-1)
    valid = yy != -100
    ref = reference_loss(z, yy, opt)
    x = opt["softcap"] * torch.tanh(z / opt["softcap"]) if opt.get("softcap") else z
    zl = torch.where(valid, opt["z_loss_weight"] * torch.logsumexp(x, -1) ** 2, 0.0)
    w = torch.tensor(opt["ce_weight"], dtype=torch.float64)[yy.clamp(min=0)] if opt.get("ce_weight") else 1.0
    den = (w * valid).sum()
    out = []
    for reduction, want, want_z in (("sum", ref.sum(), zl.sum()),
                                    ("mean", (ref - zl).sum() / den + zl.sum() / valid.sum(), zl.sum() / valid.sum())):
        got, got_z = head.loss(h, y, config=replace(cfg, reduction=reduction, return_z_loss=True))
        out += [(f"{label} reduction={reduction}", got.double(), want), (f"{label} z-loss {reduction}", got_z.double(),
                                                                          want_z)]
    return out


def check_op_tp() -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """``linear_cross_entropy`` on this rank's vocab shard (padded vocabulary: V = 29 real rows of 2 x 16,
    bias shard, reduce_grad_input) for every option and reduction, against torch's float64 cross-entropy of
    the full logits: (label, got, want) for the loss, dL/du, this rank's rows of dL/dW and dL/dbias."""
    from megatron_bottleneck.ops import linear_cross_entropy

    group, tp, rank = sh._tp()
    v_real, v_local, k, t = 29, 32 // tp, 6, 11
    gen = torch.Generator().manual_seed(9)
    u = torch.randn(t, k, generator=gen, dtype=torch.float64)
    w = torch.randn(tp * v_local, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(tp * v_local, generator=gen, dtype=torch.float64)
    y = torch.randint(0, v_real, (t,), generator=gen)
    y[2] = -100
    cw = torch.rand(v_real, generator=gen, dtype=torch.float64) + 0.5
    rows = slice(rank * v_local, (rank + 1) * v_local)
    out = []
    for name, opt in OPTIONS.items():
        opt = dict(opt, ce_weight=cw if opt.get("ce_weight") else None)
        for reduction in ("none", "sum", "mean"):
            uu, ww, bb = (x[rows].clone() if x is not u else x.clone() for x in (u, w, bias))
            uu, ww, bb = (x.float().requires_grad_(True) for x in (uu, ww, bb))
            kw = dict(opt, ce_weight=None if opt["ce_weight"] is None else opt["ce_weight"].float())
            loss = linear_cross_entropy(uu, ww, y, tp_group=group, vocab_size=v_real, bias=bb, reduction=reduction,
                                        reduce_grad_input=True, chunk_size=16, **kw)
            loss.sum().backward()
            ru, rw, rb = (x.clone().requires_grad_(True) for x in (u, w, bias))
            a = (ru @ rw.t() + rb)[:, :v_real]
            ref_opt = dict(opt, ce_weight=None if opt["ce_weight"] is None else tuple(cw.tolist()))
            ref = reference_loss(a, y, ref_opt)
            if reduction != "none":
                zl = torch.where(y != -100, opt.get("z_loss_weight", 0.0) * torch.logsumexp(
                    opt["softcap"] * torch.tanh(a / opt["softcap"]) if opt.get("softcap") else a, -1) ** 2, 0.0)
                ce = ref - zl
                den = (cw[y.clamp(min=0)] * (y != -100)).sum() if opt["ce_weight"] is not None else (y != -100).sum()
                ref = ce.sum() + zl.sum() if reduction == "sum" else ce.sum() / den + zl.sum() / (y != -100).sum()
            ref.sum().backward()
            label = f"op tp={tp} {name} {reduction}"
            out += [(f"{label} loss", loss.detach().double(), ref.detach()),
                    (f"{label} du", uu.grad.double(), ru.grad),
                    (f"{label} dW", ww.grad.double(), rw.grad[rows]),
                    (f"{label} dbias", bb.grad.double(), rb.grad[rows])]
    return out
