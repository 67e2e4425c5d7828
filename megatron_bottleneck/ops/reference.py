"""Reference head + cross-entropy that materialises the logits (for tests and benchmarks only).

Same contract and math as :func:`.linear_cross_entropy.linear_cross_entropy` on one process: logits
Z = u F^T ([T, V_rows]) are cut to the V real classes, then per token

    loss_t = (1 - s)(lse_t - z_ty) - s mean_i log p_ti + w lse_t^2,   s = alpha V / (V - 1),

0 where y_t == ignore_index. Gradients come from autograd.
"""
from __future__ import annotations

from typing import Optional

import torch


def linear_cross_entropy_reference(
    u: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    logits_out: Optional[list] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """u [T, k] or [s, b, k]; weight [V_rows, k] (the whole vocabulary); labels [T] or [s, b].

    Returns per-token loss (float32, shape of labels). ``logits_out``: if a list, the float32 real
    logits [T, V] (requiring grad when u or weight do, with ``retain_grad``) are appended to it, so a
    test can read G = dL/dZ after backward. ``softcap`` c: the loss of c tanh(Z / c) (Z itself is what
    ``logits_out`` holds, so G is the gradient through the cap).
    """
    lead = labels.shape
    u2 = u.reshape(-1, u.shape[-1])
    y = labels.reshape(-1)
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = (u2.float() @ weight.float().t())[:, :v]
    if logits_out is not None:
        if logits.requires_grad:
            logits.retain_grad()
        logits_out.append(logits)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse.unsqueeze(-1)
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    nll = -logp.gather(1, safe_y.unsqueeze(1)).squeeze(1)
    if label_smoothing > 0:
        s = label_smoothing * v / (v - 1)
        loss = (1 - s) * nll - s * logp.mean(dim=-1)
    else:
        loss = nll
    if z_loss_weight:
        loss = loss + z_loss_weight * lse * lse
    loss = torch.where(valid, loss, loss.new_zeros(()))
    return loss.reshape(lead)


# ------------------------------------------------------------------ 16-bit gradient accuracy (tests, bench)
def peaked_zipf_problem(t: int, k: int, v_rows: int, vocab: Optional[int] = None, *, alpha: float = 12.0,
                        noise: float = 0.3, zipf: float = 1.0, ignore_every: int = 0, seed: int = 0,
                        dtype: torch.dtype = torch.bfloat16):
    """A trained-like head + loss problem for 16-bit accuracy checks: (u [T, k], weight [V_rows, k], labels [T]).

    Labels are Zipfian over the ``vocab`` real classes (p_i ~ 1 / rank^zipf, ranks shuffled over the ids;
    zipf = 1 puts ~10-12% of the tokens on the top class for V = 2k-8k); weight rows are N(0, I / k) (norm
    ~1) and u_t = alpha W[y_t] + noise N(0, I / k), so the logits are peaked like a trained model's
    (mean p_y ~0.9 for alpha = 12, k = 64-128, V = 2k-4k: z_ty ~ alpha, other logits ~ N(0, alpha^2 / k)).
    Every ``ignore_every``-th label is -100. u and weight are rounded to ``dtype``.
    """
    v = v_rows if vocab is None else vocab
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(v_rows, k, generator=gen, dtype=torch.float64) / k**0.5
    p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** zipf
    ids = torch.randperm(v, generator=gen)
    y = ids[torch.multinomial(p / p.sum(), t, replacement=True, generator=gen)]
    u = alpha * w[y] + noise * torch.randn(t, k, generator=gen, dtype=torch.float64) / k**0.5
    if ignore_every:
        y[::ignore_every] = -100
    return u.to(dtype), w.to(dtype), y


def flat_zipf_problem(t: int, k: int, v_rows: int, vocab: Optional[int] = None, *, ignore_every: int = 0,
                      seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """Flat logits with Zipfian labels (the inputs of Liger-Kernel's and cut-cross-entropy's tests): (u [T, k],
    weight [V_rows, k], labels [T]) as :func:`peaked_zipf_problem` with alpha = 0 and u ~ N(0, I), so the
    logits z_ti = u_t . w_i ~ N(0, 1) (|w_i| ~ 1) and p is near uniform (p_y ~ 1 / V), labels independent of u."""
    return peaked_zipf_problem(t, k, v_rows, vocab, alpha=0.0, noise=k**0.5, ignore_every=ignore_every,
                               seed=seed, dtype=dtype)


def unfused_loss(u: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, vocab_size: Optional[int] = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                 softcap: Optional[float] = None) -> torch.Tensor:
    """Per-token loss the way an unfused head computes it (Megatron's ColumnParallelLinear +
    vocab_parallel_cross_entropy): logits = u @ weight^T in u's dtype (a 16-bit GEMM for 16-bit inputs),
    then a float32 (float64 for float64 inputs) softmax cross-entropy with Megatron's smoothing and the
    z-loss; autograd gives the 16-bit backward GEMMs. Same math as :func:`linear_cross_entropy_reference`."""
    v = weight.shape[0] if vocab_size is None else vocab_size
    logits = (u @ weight.t())[:, :v]
    logits = logits.double() if u.dtype == torch.float64 else logits.float()
    if softcap is not None:  # as Megatron-Bridge's Gemma output layer, on the upcast logits
        logits = softcap * torch.tanh(logits / softcap)
    s = label_smoothing * v / (v - 1) if label_smoothing > 0 else 0.0
    valid = labels != ignore_index
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=s)
    if z_loss_weight:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss_weight * torch.where(valid, lse * lse, 0.0)
    return loss


def gradient_errors(grads, ref, labels: torch.Tensor, top: int = 16) -> dict:
    """Relative Frobenius errors of (dL/du, dL/dW) against float64 ``ref`` (du, dW): keys "du", "dw" (whole
    weight gradient) and "dw_top" (the rows of the ``top`` most frequent labels)."""
    du, dw = (x.detach().double() for x in grads)
    rdu, rdw = (x.detach().double() for x in ref)
    y = labels[labels >= 0]
    rows = torch.bincount(y, minlength=rdw.shape[0]).topk(top).indices

    def err(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-300))

    return dict(du=err(du, rdu), dw=err(dw, rdw), dw_top=err(dw[rows], rdw[rows]))
