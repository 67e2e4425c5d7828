"""16-bit accuracy of every built-in head against float64, beside Megatron's dense path (shared by
tests/unit/test_head_precision.py, tests/distributed/test_head_precision_tp.py and bench/head_precision.py).

A problem is a head with structured parameters (vocab matrix W ``[V, D]`` with rows of norm 3, facet / MLP
projections near the identity, a low-rank head's B with orthonormal rows), rounded once to the 16-bit dtype,
Zipfian labels (p(rank i) ~ 1 / i, ranks shuffled over the ids) and head inputs h ``[s, b, D]`` that are

* ``peaked``: h_t = 12 w_{y_t} / ||w_{y_t}||^2 + 0.1 N(0, I / D) with w the head's effective linear map
  (W; A B for the low-rank head): the label's logit ~12, the others ~N(0, 1.5^2), p_y ~ 0.9 as in a trained
  model (the recipe of ``megatron_bottleneck.ops.reference.peaked_zipf_problem``);
* ``flat``: h_t ~ N(0, I / 9), so logits W h ~ N(0, 1) (the inputs of the peers' tests).

The head runs in the 16-bit dtype (``head.loss``: per-token loss, dL/dh and every parameter's gradient from
``loss.sum()``); the reference is the float64 math of :func:`tests.support_heads.reference_log_probs` on the
same rounded parameters and inputs. The yardstick is Megatron's dense path on the same inputs: 16-bit logits
z = h w^T from a 16-bit matmul, then ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (float32),
its loss, dL/dh and dL/dw against float64. Errors are relative Frobenius norms ||got - want|| / ||want||.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

import megatron_bottleneck as mb
from tests import support_heads

KINDS = ["dense", "low_rank:r=32", "mos:k=3", "mos:k=3,fused=false", "sigsoftmax", "softcap", "monotone:terms=3",
         "stacked:width=64,activation=tanh", "mfs:k=2,partitions=3"]
"""Every built-in kind (stacked at D' = D, so that its W is the dense yardstick's w)."""


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().reshape(want.shape), want.detach().double()
    return float((got - want).norm() / want.norm().clamp(min=1e-300))


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), \
        ps.get_tensor_model_parallel_rank()


def full_parameters(kind: str, d: int, v: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The problem's full float64 parameters (before rounding), by name as in ``head.named_parameters()``;
    parameters not set here (monotone's a, b) keep the head's own initial values."""
    gen = torch.Generator().manual_seed(seed)
    name = kind.split(":")[0]
    out = {}
    if name == "low_rank":
        r = int(kind.split("r=")[1].split(",")[0])
        out["weight"] = torch.randn(v, r, generator=gen, dtype=torch.float64) * (3.0 / r ** 0.5)
        out["input_proj"] = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].t()
        return out
    out["weight"] = torch.randn(v, d, generator=gen, dtype=torch.float64) * (3.0 / d ** 0.5)
    if name in ("mos", "mfs"):
        k = int(kind.split("k=")[1].split(",")[0])
        facets = k + (int(kind.split("partitions=")[1].split(",")[0]) - 1 if name == "mfs" else 0)
        out["proj"] = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(facets, d, d, generator=gen,
                                                                           dtype=torch.float64) / d ** 0.5
        out["prior"] = 0.5 * torch.randn(k, d, generator=gen, dtype=torch.float64) / d ** 0.5
    elif name == "stacked":
        out["proj"] = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=gen,
                                                                           dtype=torch.float64) / d ** 0.5
    return out


def build(kind: str, d: int, v: int, dtype: torch.dtype, seed: int = 0):
    """The head at the current TP layout, its parameters set from :func:`full_parameters` (this rank's shard
    of W) and cast to ``dtype``; returns (head, full float64 parameters after rounding)."""
    from megatron_bottleneck.base.head import HeadBuildContext
    from megatron_bottleneck.heads import HeadConfig

    group, tp, rank = _tp()
    cfg = mb.llama_config(num_layers=1, hidden_size=d, num_attention_heads=2, ffn_hidden_size=2 * d,
                          use_cpu_initialization=True, tensor_model_parallel_size=tp, pipeline_dtype=torch.float32)
    spec = HeadConfig.parse(kind)
    ctx = HeadBuildContext(hidden_size=d, vocab_size=v, real_vocab_size=v, config=cfg, seed=11)
    head = mb.base.check_head(spec.spec().builder(ctx, spec.resolved_options()), spec.kind)
    full = full_parameters(kind, d, v, seed)
    rows = v // tp
    with torch.no_grad():
        for n, p in head.named_parameters():
            if n in full:
                value = full[n][rank * rows:(rank + 1) * rows] if n == "weight" else full[n]
                p.copy_(value.to(p.dtype))
    head = head.to(dtype)
    p64 = {}
    for n, p in head.named_parameters():
        value = full[n].to(dtype) if n in full else p.detach()  # the whole W, rounded as each shard is
        p64[n] = value.double()
    return head, p64


def effective_weight(kind: str, p64: Dict[str, torch.Tensor]) -> torch.Tensor:
    """w ``[V, D]``: the head's linear map of h to its logits (A B for the low-rank head; W otherwise, the
    non-linear heads' facets and MLP being near the identity)."""
    if kind.startswith("low_rank"):
        return p64["weight"] @ p64["input_proj"]
    return p64["weight"]


def problem(w: torch.Tensor, tokens: int, peaked: bool, dtype: torch.dtype, seed: int = 1, batch: int = 4):
    """(h ``[s, b, D]`` in ``dtype``, labels ``[s, b]``) for the effective map w ``[V, D]`` (module docstring)."""
    v, d = w.shape
    gen = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64)
    ids = torch.randperm(v, generator=gen)
    y = ids[torch.multinomial(p / p.sum(), tokens, replacement=True, generator=gen)]
    if peaked:
        wy = w[y]
        h = 12.0 * wy / wy.square().sum(-1, keepdim=True) + 0.1 * torch.randn(tokens, d, generator=gen,
                                                                             dtype=torch.float64) / d ** 0.5
    else:
        h = torch.randn(tokens, d, generator=gen, dtype=torch.float64) / 3.0
    return h.to(dtype).reshape(tokens // batch, batch, d), y.reshape(tokens // batch, batch)


def _reference(kind, p64, h, y, cap, round_to=None):
    p = {n: t.clone().requires_grad_(True) for n, t in p64.items()}
    hh = h.double().reshape(-1, h.shape[-1]).clone().requires_grad_(True)
    u = support_heads.reference_log_probs(kind, p, hh, vocab=p64["weight"].shape[0], cap=cap, round_to=round_to)
    loss = -u.gather(1, y.reshape(-1, 1)).squeeze(1)
    loss.sum().backward()
    return loss.detach(), hh.grad, {n: t.grad for n, t in p.items()}


def dense_path_errors(w: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Megatron's dense path (16-bit h w^T, float32 vocab-parallel cross-entropy at TP=1) against float64:
    relative errors of the per-token loss, dL/dh and dL/dw, on the 16-bit-rounded w and h."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    w16 = w.to(h.dtype).requires_grad_(True)
    x = h.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(torch.matmul(x, w16.t()), y)
    loss.sum().backward()
    w64 = w.to(h.dtype).double().requires_grad_(True)
    x64 = h.double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy((x64 @ w64.t()).reshape(-1, w.shape[0]), y.reshape(-1),
                                             reduction="none")
    want.sum().backward()
    return {"loss": rel(loss.reshape(-1), want.detach()), "dh": rel(x.grad, x64.grad), "dw": rel(w16.grad, w64.grad)}


def _errors(loss, dh, grads, ref):
    ref_loss, ref_dh, ref_dp = ref
    out = {"loss": rel(loss.reshape(-1), ref_loss), "dh": rel(dh, ref_dh)}
    out.update({f"d{n}": rel(g, ref_dp[n]) for n, g in grads.items()})
    return out


def emulation_errors(kind: str, head, p64: Dict[str, torch.Tensor], h: torch.Tensor, y: torch.Tensor,
                     ref=None) -> Dict[str, float]:
    """The errors (keys as :func:`head_errors`) of the float64 emulation of the 16-bit head: its GEMM outputs
    and activations rounded to h's dtype, every softmax and the backward exact
    (``reference_log_probs(round_to=)``): what 16-bit GEMMs alone cost, whatever the softmax precision."""
    cap = float(getattr(head, "cap", 30.0))
    ref = ref or _reference(kind, p64, h, y, cap)
    loss, dh, grads = _reference(kind, p64, h, y, cap, round_to=h.dtype)
    return _errors(loss, dh, grads, ref)


def head_errors(kind: str, head, p64: Dict[str, torch.Tensor], h: torch.Tensor, y: torch.Tensor,
                ref=None) -> Dict[str, float]:
    """The head's relative errors against float64 at TP=1: ``loss``, ``dh`` and ``d<name>`` per parameter."""
    ref = ref or _reference(kind, p64, h, y, float(getattr(head, "cap", 30.0)))
    head.zero_grad(set_to_none=True)
    x = h.clone().requires_grad_(True)
    loss = head.loss(x, y)
    loss.sum().backward()
    assert loss.dtype == torch.float32, loss.dtype
    return _errors(loss, x.grad, {n: p.grad for n, p in head.named_parameters()}, ref)


def measure(kind: str, dtype: torch.dtype, peaked: bool, d: int = 64, v: int = 4096, tokens: int = 256,
            seed: int = 0, emulate: bool = False) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, float]]:
    """(head errors, dense-path errors, emulation errors or {}) of one case at TP=1 (Megatron's parallel state
    initialised)."""
    head, p64 = build(kind, d, v, dtype, seed)
    w = effective_weight(kind, p64)
    h, y = problem(w, tokens, peaked, dtype, seed + 1)
    ref = _reference(kind, p64, h, y, float(getattr(head, "cap", 30.0)))
    emulated = emulation_errors(kind, head, p64, h, y, ref) if emulate else {}
    return head_errors(kind, head, p64, h, y, ref), dense_path_errors(w, h, y), emulated


def probe_figures(kind: str, d: int, v: int, tokens: int, peaked: bool, dtype: torch.dtype = torch.bfloat16,
                  iterations: int = 0, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """The general probe's figures (``head_figures`` with update) of a 16-bit head at TP=1, three ways:
    ``got`` the 16-bit head's ``log_prob_fn`` (what the probe runs), ``exact`` the same function on float64
    copies of its (rounded) parameters and inputs, ``emulated`` :func:`support_heads.reference_log_probs` with
    ``round_to=dtype`` (the 16-bit GEMM outputs, everything else float64: what the 16-bit GEMMs alone cost)."""
    import dataclasses

    from megatron_bottleneck.base.head import HeadLogProb
    from megatron_bottleneck.probe.general import head_figures

    head, p64 = build(kind, d, v, dtype, seed)
    h, y = problem(effective_weight(kind, p64), tokens, peaked, dtype, seed + 1, batch=1)
    h, y = h.reshape(-1, d), y.reshape(-1)
    lp = head.log_prob_fn()
    its = iterations or 2 * d
    cap = float(getattr(head, "cap", 30.0))

    def figures(log_prob, hh):
        return {k: float(x) for k, x in head_figures(log_prob, hh, y, iterations=its, update=True).items()}

    emulated = HeadLogProb(
        fn=lambda p, hh: support_heads.reference_log_probs(kind, p, hh, vocab=v, cap=cap, round_to=dtype),
        params=p64, sharded=frozenset({"weight"}), vocab_start=0, vocab_size=v, n_valid=v)
    return {"got": figures(lp, h),
            "exact": figures(dataclasses.replace(lp, params={k: x.double() for k, x in lp.params.items()}),
                             h.double()),
            "emulated": figures(emulated, h.double())}
