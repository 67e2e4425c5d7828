"""The built-in non-linear heads against pure-torch float64 references, on whatever TP layout Megatron's
parallel state has (shared by tests/unit/test_head_zoo.py at TP=1 and tests/distributed/test_head_zoo.py at
TP=2 and TP=2 + SP). Every comparison is made on the rank, the float64 reference built from the full
(all-gathered) parameters; results come back as (got, want) pairs of tensors.

The reference math is written here again, independently of megatron_bottleneck.heads:

    mos:        u = logsumexp_k(log_softmax(U h)_k + log_softmax(W tanh(P_k h))),
    sigsoftmax: u = log_softmax(z + log sigmoid(z)),  softcap: log_softmax(c tanh(z / c)),
    monotone:   u = log_softmax(z + sum_j softplus(a_j) tanh(z - b_j)),  z = W h,
    stacked:    u = log_softmax(W act(P h)),
    mfs:        as mos over facets z_1,i = W_i tanh(P_{j(i)} h) (j(i) = i // ceil(V_REAL / J)), z_k = W tanh(P_{J+k-2} h),
    mixtape:    u = log_softmax(sum_k pi_k,i W_i tanh(H_k h)), pi from the sigmoid tree of
                l_n,i = v_{min(i,S),n} . tanh(U_n h) + b_{min(i,S),n} (leaf k: the bits of k from the root),
    decoupled:  u = log_softmax(W P h),
    loss_t = -u[t, y_t] (0 where y_t = -100).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import megatron_bottleneck as mb

D, V_REAL, V_PAD, S, B = 8, 60, 64, 8, 2
KINDS = ["mos:k=3", "mos:k=2,fused=false", "sigsoftmax", "softcap:cap=2", "monotone:terms=3",
         "stacked:width=12,activation=tanh", "mfs:k=2,partitions=3", "mixtape:k=4,frequent=20,gate_width=4",
         "decoupled:width=12"]
FUSED = {"mos:k=3", "stacked:width=12,activation=tanh", "decoupled:width=12"}  # kinds whose loss is fused: also checked materialised


def head_config(tp: int, sp: bool):
    return mb.llama_config(num_layers=1, hidden_size=D, num_attention_heads=2, ffn_hidden_size=16,
                           use_cpu_initialization=True, tensor_model_parallel_size=tp, sequence_parallel=sp,
                           pipeline_dtype=torch.float32, init_method_std=0.3)


def build(kind: str, tp: int, sp: bool):
    from megatron_bottleneck.base.head import HeadBuildContext
    from megatron_bottleneck.heads import HeadConfig

    head = HeadConfig.parse(kind)
    ctx = HeadBuildContext(hidden_size=D, vocab_size=V_PAD, real_vocab_size=V_REAL, config=head_config(tp, sp),
                           seed=11)
    module = head.spec().builder(ctx, head.resolved_options())
    return mb.base.check_head(module, head.kind)


def reference_log_probs(kind: str, p: Dict[str, torch.Tensor], h: torch.Tensor, vocab: int = V_REAL,
                        cap: float = 2.0, round_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """float64 u [T, vocab] from full parameters p and h [T, D] (``cap``: the softcap kind's c; dense:
    log_softmax(h W^T), low_rank: log_softmax(h B^T A^T)). ``round_to``: each GEMM output and each activation
    the heads compute in their parameters' dtype is rounded to that (16-bit) dtype, everything else exact:
    the float64 emulation of a 16-bit head whose softmax maths are exact (rounding is straight-through for
    autograd)."""
    name = kind.split(":")[0]
    w = p["weight"][:vocab]

    def r(x):
        return x if round_to is None else x + (x.detach().to(round_to).double() - x.detach())

    if name == "dense":
        return torch.log_softmax(r(h @ w.t()), dim=-1)
    if name == "low_rank":
        return torch.log_softmax(r(r(h @ p["input_proj"].t()) @ w.t()), dim=-1)
    if name == "mos":
        hk = r(torch.tanh(r(torch.stack([h @ pk.t() for pk in p["proj"]], dim=1))))  # [T, K, D]
        log_pi = torch.log_softmax(r(h @ p["prior"].t()), dim=-1)
        logp = torch.log_softmax(r(hk @ w.t()), dim=-1)  # [T, K, V]
        return torch.logsumexp(log_pi.unsqueeze(-1) + logp, dim=1)
    if name == "mfs":
        j = int(kind.split("partitions=")[1].split(",")[0])
        f = r(torch.tanh(r(torch.stack([h @ pe.t() for pe in p["proj"]], dim=1))))  # [T, J + K - 1, D]
        part = torch.arange(vocab) // -(-vocab // j)  # each word's partition
        # word i's logit from its partition's facet: all J facets against every word, then each word's pick
        z1 = torch.einsum("ted,vd->tve", f[:, :j], w).gather(2, part.expand(h.shape[0], -1).unsqueeze(2))[..., 0]
        z = r(torch.stack([z1] + [f[:, e] @ w.t() for e in range(j, f.shape[1])], dim=1))  # [T, K, V]
        log_pi = torch.log_softmax(r(h @ p["prior"].t()), dim=-1)
        return torch.logsumexp(log_pi.unsqueeze(-1) + torch.log_softmax(z, dim=-1), dim=1)
    if name == "stacked":
        return torch.log_softmax(r(r(torch.tanh(r(h @ p["proj"].t()))) @ w.t()), dim=-1)
    if name == "decoupled":
        return torch.log_softmax(r(r(h @ p["proj"].t()) @ w.t()), dim=-1)
    if name == "mixtape":
        k, shared = p["proj"].shape[0], p["gate_vec"].shape[0] - 1
        c = r(torch.tanh(r(torch.einsum("td,ked->tke", h, p["proj"]))))  # [T, K, D]
        q = r(torch.tanh(r(torch.einsum("td,ngd->tng", h, p["gate_proj"]))))  # [T, K - 1, G]
        gid = torch.clamp(torch.arange(vocab), max=shared)  # each word's gate row
        gate = torch.sigmoid(r(r(torch.einsum("tng,ing->tni", q, p["gate_vec"][gid])) + p["gate_bias"][gid].t()))
        depth = k.bit_length() - 1
        pis = []
        for leaf in range(k):  # walk root -> leaf by the bits of the leaf's index, most significant first
            node, pi = 0, torch.ones_like(gate[:, 0])
            for level in reversed(range(depth)):
                right = (leaf >> level) & 1
                pi = pi * (1 - gate[:, node] if right else gate[:, node])
                node = 2 * node + 1 + right
            pis.append(pi)
        dots = r(torch.einsum("tkd,vd->tkv", c, w))
        return torch.log_softmax((torch.stack(pis, dim=1) * dots).sum(dim=1), dim=-1)
    z = r(h @ w.t())
    if name == "sigsoftmax":
        f = z + F.logsigmoid(z)
    elif name == "softcap":
        f = cap * torch.tanh(z / cap)
    else:
        f = z.clone()
        for a, b in zip(p["mono_scale"], p["mono_shift"]):
            f = f + F.softplus(a) * torch.tanh(z - b)
    return torch.log_softmax(f, dim=-1)


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), \
        ps.get_tensor_model_parallel_rank()


def _gather0(x: torch.Tensor, group, tp: int) -> torch.Tensor:
    if tp == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _full_params(head, group, tp) -> Dict[str, torch.Tensor]:
    return {n: (_gather0(p, group, tp) if n == "weight" else p.detach().clone()).double()
            for n, p in head.named_parameters()}


def _grads(head, group, tp, sp) -> Dict[str, torch.Tensor]:
    """Full gradients: W's shards gathered; replicated ones summed over TP where Megatron's finalize would
    (tagged sequence_parallel: partial per sequence shard under SP)."""
    out = {}
    for n, p in head.named_parameters():
        g = p.grad.detach().clone()
        if n == "weight":
            g = _gather0(g, group, tp)
        elif getattr(p, "sequence_parallel", False) and tp > 1:
            dist.all_reduce(g, group=group)
        out[n] = g
    return out


def _local(h: torch.Tensor, rank: int, tp: int, sp: bool) -> torch.Tensor:
    """The head's input on this rank: the sequence shard under SP, else the whole sequence."""
    s = S // tp
    return h[rank * s:(rank + 1) * s] if sp else h


def _inputs():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(S, B, D, generator=gen)
    y = torch.randint(0, V_REAL, (S, B), generator=gen)
    y[1, 0] = -100
    y[5, 1] = V_REAL - 1  # a label on the last shard's real rows
    g_cot = torch.randn(S * B, V_REAL, generator=gen, dtype=torch.float64)
    t_h = torch.randn(S * B, D, generator=gen, dtype=torch.float64)
    return h, y, g_cot, t_h


def _reference(kind, p, h, y):
    """float64 loss [S, B] and its gradients w.r.t. h and every parameter."""
    p = {n: v.clone().requires_grad_(True) for n, v in p.items()}
    hh = h.double().clone().requires_grad_(True)
    u = reference_log_probs(kind, p, hh.reshape(-1, D))
    yy = y.reshape(-1)
    valid = yy != -100
    nll = -u.gather(1, torch.where(valid, yy, 0).unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, nll, torch.zeros_like(nll)).reshape(S, B)
    loss.sum().backward()
    return loss.detach(), hh.grad, {n: v.grad for n, v in p.items()}, u.detach()


def check_heads(sp: bool = False, ckpt_dir: str = "") -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Every kind on this layout: (label, got, want) triples for the forward, the loss and gradients (of the
    head's loss and, for fused kinds, of the materialised one), log_prob_fn's value, VJP and JVP."""
    group, tp, rank = _tp()
    sp = sp and tp > 1
    h, y, g_cot, t_h = _inputs()
    out = []
    for kind in KINDS:
        torch.manual_seed(0)
        head = build(kind, tp, sp)
        p_full = _full_params(head, group, tp)
        ref_loss, ref_dh, ref_dp, ref_u = _reference(kind, p_full, h, y)
        n, start = head.n_valid, head.vocab_start
        cols = slice(start, start + n)
        paths = ["loss"] + (["materialised"] if kind in FUSED else [])
        for path in paths:
            head.zero_grad(set_to_none=True)
            x = _local(h, rank, tp, sp).clone().requires_grad_(True)
            if path == "loss":
                loss = head.loss(x, y)
            else:
                loss = mb.heads.VocabParallelHead.loss(head, x, y)
            loss.sum().backward()
            tag = f"{kind} {path} tp={tp} sp={sp}"
            out.append((f"{tag} loss", loss.detach().double(), ref_loss))
            dh = _gather0(x.grad, group, tp) if sp else x.grad
            out.append((f"{tag} dL/dh", dh.double(), ref_dh))
            for name, g in _grads(head, group, tp, sp).items():
                out.append((f"{tag} dL/d{name}", g.double(), ref_dp[name]))
        # the unfused forward: u itself (padded rows at the dtype's minimum)
        with torch.no_grad():
            u, _ = head(_local(h, rank, tp, sp))
        out.append((f"{kind} forward tp={tp} sp={sp}", u[..., :n].reshape(-1, n).double(), ref_u[:, cols]))
        assert bool((u[..., n:] <= -1e30).all())
        if sp:  # log_prob_fn takes the whole sequence whatever the layout: checked without SP
            continue
        # the general probe's contract: value, VJP (full J^T g on every rank), JVP (this rank's columns)
        lp = head.log_prob_fn()
        assert (lp.n_valid, lp.vocab_start, lp.vocab_size) == (n, start, V_REAL)
        h2 = h.reshape(-1, D).double()
        params = {k: v.double() for k, v in lp.params.items()}
        u_got, vjp_fn = torch.func.vjp(lambda hh, pp: lp.fn(pp, hh), h2, params)
        out.append((f"{kind} log_prob_fn tp={tp}", u_got, ref_u[:, cols]))
        dh_got, dp_got = vjp_fn(g_cot[:, cols].contiguous())
        ref_fn = lambda hh, pp: reference_log_probs(kind, pp, hh)  # noqa: E731
        _, ref_vjp = torch.func.vjp(ref_fn, h2, p_full)
        dh_ref, dp_ref = ref_vjp(g_cot)
        out.append((f"{kind} log_prob_fn VJP dh tp={tp}", dh_got, dh_ref))
        for name in dp_ref:
            got = _gather0(dp_got[name], group, tp) if name == "weight" else dp_got[name]
            out.append((f"{kind} log_prob_fn VJP d{name} tp={tp}", got, dp_ref[name]))
        _, du_got = torch.func.jvp(lambda hh: lp.fn(params, hh), (h2,), (t_h,))
        _, du_ref = torch.func.jvp(lambda hh: ref_fn(hh, p_full), (h2,), (t_h,))
        out.append((f"{kind} log_prob_fn JVP tp={tp}", du_got, du_ref[:, cols]))
        if ckpt_dir:
            out += _checkpoint_round_trip(kind, head, ckpt_dir, tp)
    return out


def _checkpoint_round_trip(kind, head, ckpt_dir, tp):
    """Save this head (perturbed) with Megatron's distributed checkpointing; the caller reloads it at TP=1."""
    from megatron.core import dist_checkpointing

    path = os.path.join(ckpt_dir, kind.replace(":", "_").replace(",", "_").replace("=", ""))
    os.makedirs(path, exist_ok=True)
    group, tp_, rank = _tp()
    init = _full_params(build(kind, tp_, False), group, tp_)  # a fresh head's: for the TP-invariance check
    if rank == 0:
        torch.save(init, os.path.join(path, f"init_tp{tp}.pt"))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    dist_checkpointing.save(head.sharded_state_dict(prefix="head."), path)
    full = _full_params(head, group, tp_)
    if rank == 0:
        torch.save(full, os.path.join(path, f"full_tp{tp}.pt"))
    return []


def load_at_current_layout(ckpt_dir: str) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Every checkpoint saved by :func:`check_heads` loaded into a fresh head of this layout: its full
    parameters against the saved ones."""
    from megatron.core import dist_checkpointing

    group, tp, _ = _tp()
    out = []
    for kind in KINDS:
        path = os.path.join(ckpt_dir, kind.replace(":", "_").replace(",", "_").replace("=", ""))
        head = build(kind, tp, False)
        fresh = _full_params(head, group, tp)
        sd = dist_checkpointing.load(head.sharded_state_dict(prefix="head."), path)
        head.load_state_dict({k[len("head."):]: v for k, v in sd.items()}, strict=True)
        saved = torch.load(os.path.join(path, "full_tp2.pt"))
        init = torch.load(os.path.join(path, "init_tp2.pt"))
        got = _full_params(head, group, tp)
        for name in init:  # the same seed draws the same full parameters at TP=2 and TP=1
            out.append((f"{kind} init tp=2 == tp={tp} {name}", fresh[name], init[name]))
        for name in saved:
            assert not torch.equal(fresh[name], saved[name])
            out.append((f"{kind} checkpoint tp=2 -> tp={tp} {name}", got[name], saved[name]))
    return out


def heads_on_layout(tp: int, sp_too: bool, ckpt_dir: str = ""):
    """Rank function: Megatron's parallel state at TP=tp, every check, and (with ckpt_dir) TP=2 -> TP=1."""
    mb.initialize_parallel(tp, 1, seed=5)
    out = check_heads(False, ckpt_dir)
    if sp_too:
        out += check_heads(True)
    if ckpt_dir:
        dist.barrier()
        mb.destroy_parallel()
        mb.initialize_parallel(1, 1, seed=5)
        out += load_at_current_layout(ckpt_dir)
    mb.destroy_parallel()
    return out


def brute_probe_figures(kind: str, p: Dict[str, torch.Tensor], h: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """The general probe's figures from full float64 parameters, by brute force: each token's full Jacobian of
    the reference u (autograd), centred, SVD -> visible energy; dU = J_h dh + J_theta dtheta from the full
    Jacobians w.r.t. h and every parameter (an SGD step's first-order change), centred."""
    v = V_REAL
    u = reference_log_probs(kind, p, h)
    g = u.exp() - F.one_hot(y, v).double()
    c = torch.eye(v, dtype=torch.float64) - 1.0 / v
    names = sorted(p)
    # dtheta = sum_t J_theta,t^T g_t: the gradient of <u, g> with g held fixed
    leaves = {n: p[n].clone().requires_grad_(True) for n in names}
    (reference_log_probs(kind, leaves, h) * g).sum().backward()
    dtheta = {n: leaves[n].grad for n in names}
    vis, du = 0.0, []
    for t in range(h.shape[0]):
        j_h = torch.autograd.functional.jacobian(lambda x: reference_log_probs(kind, p, x[None])[0], h[t])
        q, s, _ = torch.linalg.svd(c @ j_h, full_matrices=False)
        r = int((s > s[0] * v * 1e-12).sum())
        vis += float(((q[:, :r].t() @ g[t]) ** 2).sum())
        row = j_h @ (j_h.t() @ g[t])
        for n in names:
            j_p = torch.autograd.functional.jacobian(
                lambda x, n=n: reference_log_probs(kind, {**p, n: x}, h[t:t + 1])[0], p[n])
            row = row + j_p.reshape(v, -1) @ dtheta[n].reshape(-1)
        du.append(row)
    du = torch.stack(du) @ c
    g2 = float((g ** 2).sum())
    return {"destroyed_ratio": (1 - vis / g2) ** 0.5,
            "update_cosine": float((g * du).sum() / (g.norm() * du.norm()))}


PROBE_CASES = [("mos:k=2,fused=false", True), ("sigsoftmax", False)]
"""(kind, fused) cases of :func:`probe_in_training` (float64: the mixture of softmaxes through its materialised
loss, the fused op being float32-only; the trainer test runs the fused op): the fused model path (labels from the head's
loss context) and the unfused sigsoftmax head (G from the log-probabilities' output gradient)."""


def head_loss_of(head, x, y, fused: bool):
    """Per-token loss of a head on input x: its fused loss (through a loss context, as the fused model passes
    labels) or Megatron's vocab-parallel cross-entropy of its unfused output."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_bottleneck.heads import FusedLossConfig, LossContext

    if fused:
        head.loss_context = LossContext(y, FusedLossConfig())
        loss, _ = head(x)
        head.loss_context = None
        return loss
    u, _ = head(x)
    return vocab_parallel_cross_entropy(u.clone(), y)


def probe_in_training(kind: str, fused: bool, sp: bool, tokens: int = 20, sync_counter=None,
                      brute: bool = True, forwards_ahead: bool = False, begin: Optional[int] = None,
                      reference: bool = True) -> Dict:
    """Rank function (any TP layout): ``GradientProbe`` (cheap + update figures, ``general_tokens=tokens``) on a
    float64 head over two micro-batches of [S, B] tokens driven as the models drive it (fused: a
    ``LossContext`` with the labels, the head returns -log p(y); unfused: Megatron's vocab-parallel
    cross-entropy of the head's log-probabilities), the loss the micro-batch mean / 2. Returns the probe's record,
    ``head_figures`` and (``brute``) the brute force on the same (first ``tokens``) tokens, and the loss weight w = 1/(2 S B).
    With ``sync_counter`` (a TorchDispatchMode class), also the host syncs of the forward-backward passes with
    and without the probe, and of ``end_step``. ``forwards_ahead``: both forwards run before the first backward
    (as combined 1F1B or an interleaved schedule may run them); ``begin``: the step is opened by
    ``probe.begin_step(begin)`` (else by its first forward, of ``watch``'s 2 micro-batches); ``reference=False``:
    the record only (no ``head_figures``, no brute force)."""
    import dataclasses

    from megatron_bottleneck.probe.general import head_figures

    group, tp, rank = _tp()
    head = build(kind, tp, sp).double()
    head.train()
    gen = torch.Generator().manual_seed(13)
    hs = [torch.randn(S, B, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(2)]
    ys = [torch.randint(0, V_REAL, (S, B), generator=gen) for _ in range(2)]
    probe = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, general_tokens=tokens,
                                            general_iterations=2 * D))

    def forward(h, y):
        return head_loss_of(head, _local(h, rank, tp, sp).clone().requires_grad_(True), y, fused).mean() / 2

    def step():
        if forwards_ahead:
            for loss in [forward(h, y) for h, y in zip(hs, ys)]:
                loss.backward()
        else:
            for h, y in zip(hs, ys):
                forward(h, y).backward()

    syncs = {}
    if sync_counter is not None:
        off = sync_counter()
        with off:
            step()
        syncs["without_probe"] = off.count
    probe.watch_head(head, num_microbatches=2)
    if begin is not None:
        probe.begin_step(begin)
    counter = sync_counter() if sync_counter is not None else None
    if counter is not None:
        with counter:
            step()
        syncs["with_probe"] = counter.count
        end = sync_counter()
        with end:
            probe.end_step()
        syncs["end_step"] = end.count
    else:
        step()
        probe.end_step()
    records = len(probe.history)
    record = dict(probe.history[-1]) if probe.history else {}
    if not reference:
        probe.remove()
        return {"record": record, "error": probe.last_error, "records": records, "enabled": probe.enabled}
    h_all = torch.cat([h.reshape(-1, D) for h in hs])[:tokens]
    y_all = torch.cat([y.reshape(-1) for y in ys])[:tokens]
    lp = head.log_prob_fn()
    lp = dataclasses.replace(lp, params={k: v.double() for k, v in lp.params.items()})
    want = {k: float(v) for k, v in head_figures(lp, h_all, y_all, update=True).items()}
    full = _full_params(head, group, tp)
    brute = brute_probe_figures(kind, full, h_all, y_all) if brute else None
    probe.remove()
    return {"record": record, "head_figures": want, "brute": brute, "weight": 1.0 / (2 * S * B), "syncs": syncs,
            "error": probe.last_error, "records": records, "enabled": probe.enabled}
