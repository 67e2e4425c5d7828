"""The probe's math for one optimizer step: exact, vocab-parallel, no V-sized gathers.

Notation: T tokens, D hidden, V vocabulary (real, unpadded); G = dL/dZ (T x V), head W (V x D),
H (T x D) the head input, dH = dL/dH = G W. Under vocab-parallel TP each rank holds a vocab shard of G
and W; dH is already summed over shards by the head's backward (Megatron all-reduces or, under sequence
parallelism, reduce-scatters it), so the probe reads it from a hook on H instead of recomputing G W.

Cheap figures (every probed step). With Q an orthonormal basis of col(W):

    ||G Q Q^T||_F^2 = tr( dH (W^T W)^+ dH^T ) = tr( K (W^T W)^+ ),   K = dH^T dH   (D x D)
    destroyed ratio r = sqrt(1 - ||G Q Q^T||^2 / ||G||^2),  visible cosine c = sqrt(1 - r^2)
    ||dL/dH||_F^2 = tr(K),   isotropic baseline sqrt(1 - rank(W) / (V - 1))

W^T W = M^T (F^T F) M from the head's view (F a basis factor of W, M the mix: dense F = W, M = I;
low rank F = A, M = B), so only the k x k matrix F^T F is summed over TP; ||G||^2 is a sum of local
squares. For a low-rank head (M of shape r x D, r < D) the rows of dH = G F M lie in row(M): with Q
(D x r) an orthonormal basis of it (QR of M^T, once per step), K = Q (Y^T Y) Q^T with Y = dH Q (T x r),
so each micro-batch costs T D r + T r^2 instead of T D^2, and only r x r sums cross TP; tr(K) is taken
from ||dH||_F^2 directly. With a padded vocabulary (Megatron pads V to a multiple of TP), padded columns are excluded
everywhere: dH is corrected by the padded columns' share G_pad W_pad (one T x D all-reduce per
micro-batch). (W^T W)^+ is an eigen-pseudo-inverse in float64 with relative cut ``PINV_RTOL``.

Update-direction figures (``update=True``). One SGD step on (H, W) changes the logits, to first order,
by dZ = -(G W W^T + H P) with P = H^T G (D x V) summed over the step. Then, with all sums over the step:

    <G, -dZ>          = tr(K) + ||P||^2
    ||dZ||^2          = tr(K W^T W) + tr( (H^T H)(P P^T) ) + 2 ||H^T dH||^2
    update cosine     = <G, -dZ> / (||G|| ||dZ||)

P P^T (D x D) and ||P||^2 are sums over vocab shards; H^T H, H^T dH and K are sums over tokens (over
TP ranks too under sequence parallelism). P costs one T x D x V/tp product per micro-batch: that is why
these figures have their own interval.

Numerics: products run in float64 on GPUs and float32 on CPUs (bf16/fp16 inputs are upcast), sums
are kept in float64. A non-finite G or dH makes every figure NaN and sets ``nonfinite_grad`` = 1; nothing raises.
Nothing here modifies its inputs or touches any RNG.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.head import HeadView

PINV_RTOL = 1e-10


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of the per-micro-batch products: float64 on GPUs (cheap there, and immune to TF32),
    float32 on CPUs (float64 halves CPU matmul speed; the products' relative error stays ~1e-6)."""
    return torch.float64 if t.is_cuda else torch.float32


def pinv_psd(a: torch.Tensor, rtol: float = PINV_RTOL):
    """Pseudo-inverse and numerical rank of a symmetric PSD matrix (float64 eigendecomposition)."""
    vals, vecs = torch.linalg.eigh(a.double())
    cut = vals.max().clamp(min=0) * rtol
    keep = vals > cut
    inv = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].t()
    return inv, int(keep.sum())


def _visible_energy(k, ftf, mix, wtw, need_pinv: bool = False, rtol: float = PINV_RTOL):
    """||G Q Q^T||^2 = tr(K (W^T W)^+), its head rank, and (W^T W)^+ when asked.

    Fast path, F and M of full rank k: with G F = dH M^T (M M^T)^-1 the trace lives in k x k,
    tr(S M K M^T S (F^T F)^-1) with S = (M M^T)^-1 (M = I for a dense head), by Cholesky. A
    near-singular F^T F (condition beyond 1/PINV_RTOL) falls back to the eigen-pseudo-inverse of W^T W.
    """
    kk = ftf.shape[0]
    if not need_pinv:
        chol, info = torch.linalg.cholesky_ex(ftf)
        diag = chol.diagonal() ** 2 if int(info) == 0 else None
        if diag is not None and float(diag.min()) > PINV_RTOL * float(diag.max()):
            k_basis = k
            if mix is not None:
                mchol, minfo = torch.linalg.cholesky_ex(mix @ mix.t())
                mdiag = mchol.diagonal() ** 2
                if int(minfo) != 0 or float(mdiag.min()) <= PINV_RTOL * float(mdiag.max()):
                    k_basis = None  # M not of full row rank
                else:
                    s = torch.cholesky_inverse(mchol)
                    k_basis = s @ (mix @ k @ mix.t()) @ s
            if k_basis is not None:
                vis2 = float(torch.cholesky_solve(k_basis, chol).diagonal().sum())
                return vis2, kk, None
    pinv, rank = pinv_psd(wtw, rtol)
    return float((k * pinv).sum()), rank, pinv


def isotropic_baseline(head_rank: int, vocab_size: int) -> float:
    """Destroyed ratio of an isotropic gradient against a random rank-``head_rank`` subspace."""
    return max(0.0, 1.0 - head_rank / max(vocab_size - 1, 1)) ** 0.5


class StepAccumulator:
    """Collects one step's micro-batches (local work only) and finalises the figures.

    Call :meth:`add_logit_grad` with each micro-batch's logit-gradient shard and :meth:`add_hidden_grad`
    with its dL/dH (both from backward hooks), then :meth:`finalize` once per step (it runs the
    all-reduces). ``sequence_parallel``: dH and H are sequence shards (token sums then add over TP).
    """

    def __init__(self, update: bool = False, sequence_parallel: bool = False, num_buckets: int = 0,
                 tp_group=None):
        self.tp_group = tp_group
        self.update = update
        self.sequence_parallel = sequence_parallel
        self.num_buckets = num_buckets
        self.view: Optional[HeadView] = None
        self.g2 = torch.zeros((), dtype=torch.float64)
        self.k = None  # dH^T dH, D x D
        self.p = None  # H^T G (local vocab shard), D x V_valid
        self.hth = None  # H^T H
        self.htdh = None  # H^T dH
        self.g2_buckets = None
        self.q = None  # D x r basis of row(M) when K is kept reduced (low-rank head, cheap figures only)
        self.k_red = None  # Y^T Y = Q^T K Q, r x r
        self.trk = None  # ||dH||_F^2
        self.vis_tokens = []  # per micro-batch dH rows, kept only for buckets
        self.pad_corrections = []  # per micro-batch G_pad W_pad (T x D), only with a padded vocabulary

    # ------------------------------------------------------------ local work
    def add_logit_grad(self, grad: torch.Tensor, view: HeadView, hidden_full: Optional[torch.Tensor] = None) -> None:
        """grad: [s, b, V_local] (or [T, V_local]) logit gradient shard; hidden_full: [s, b, D] full-sequence
        head input (needed only for update figures)."""
        self.view = view
        n = view.valid_rows()
        g = grad.reshape(-1, grad.shape[-1])[:, :n]
        # float32 accumulation (cascade sum, relative error ~1e-7); a float64 cast of G costs 15x more.
        self.g2 = self.g2.to(g.device) + torch.linalg.vector_norm(g, dtype=torch.float32).double().square()
        if self.num_buckets:
            sq = torch.linalg.vector_norm(g, dim=1, dtype=torch.float32).double().square()
            rows = grad.shape[0] if grad.dim() == 3 else g.shape[0]
            batch = g.shape[0] // rows
            pos = torch.arange(rows, device=g.device).repeat_interleave(batch)
            self._bucket_add("g2_buckets", sq, pos, rows)
        if view.vocab_size < get_pg_size(self.tp_group) * view.basis.shape[0]:
            self.pad_corrections.append(self._padding_part(grad.reshape(-1, grad.shape[-1]), view, n))
        if self.update:
            dt = _work_dtype(g)
            h = hidden_full.reshape(-1, hidden_full.shape[-1]).to(dt)
            p = h.t() @ g.to(dt)  # D x V_valid
            self.p = p.double() if self.p is None else self.p + p.double()

    def add_logit_sq_norms(self, sq: torch.Tensor, view: HeadView) -> None:
        """A fused head + loss's micro-batch: per-token ||dL/dz_t||^2 ``[s, b]`` (or ``[T]``), already summed over
        vocab shards and without padded columns (the fused pass excludes them from the softmax), instead of
        the logit gradient itself. Update figures need G: not available from this."""
        self.view = view
        # Every TP rank holds the same totals and finalize sums g2 over TP: count them on TP rank 0 only.
        sq = sq.double() * (1.0 if get_pg_rank(self.tp_group) == 0 else 0.0)
        self.g2 = self.g2.to(sq.device) + sq.sum()
        if self.num_buckets:
            rows = sq.shape[0]
            per_token = sq.reshape(rows, -1)
            pos = torch.arange(rows, device=sq.device).repeat_interleave(per_token.shape[1])
            self._bucket_add("g2_buckets", per_token.reshape(-1), pos, rows)

    def add_hidden_grad(self, hidden_grad: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> None:
        """hidden_grad: dL/dH at the head input, [s(/tp), b, D]; hidden: H of the same shape (update)."""
        dh = hidden_grad.reshape(-1, hidden_grad.shape[-1]).to(_work_dtype(hidden_grad))
        if self.pad_corrections:  # remove the padded columns' share: dH_real = dH - G_pad W_pad
            c = self.pad_corrections.pop(0)
            if self.sequence_parallel:
                c = c.reshape(get_pg_size(self.tp_group), -1, c.shape[-1])[get_pg_rank(self.tp_group)]
            dh = dh - c.to(dh.dtype)
        if self._reduced():
            if self.q is None:
                self.q = torch.linalg.qr(self.view.mix.t().to(dh.dtype))[0]  # D x r, its span contains row(M)
            y = dh @ self.q.to(dh.device)
            k_red, trk = (y.t() @ y).double(), torch.linalg.vector_norm(dh).double().square()
            self.k_red = k_red if self.k_red is None else self.k_red + k_red
            self.trk = trk if self.trk is None else self.trk + trk
        else:
            k = (dh.t() @ dh).double()
            self.k = k if self.k is None else self.k + k
        if self.num_buckets:
            self.vis_tokens.append((dh, hidden_grad.shape[0] if hidden_grad.dim() == 3 else dh.shape[0]))
        if self.update:
            h = hidden.reshape(-1, hidden.shape[-1]).to(dh.dtype)
            hth, htdh = (h.t() @ h).double(), (h.t() @ dh).double()
            self.hth = hth if self.hth is None else self.hth + hth
            self.htdh = htdh if self.htdh is None else self.htdh + htdh

    def _reduced(self) -> bool:
        """Keep K as Q^T K Q: a low-rank head's mix (r < D) and neither update figures nor buckets (they use
        the full D x D products)."""
        mix = self.view.mix if self.view is not None else None
        return mix is not None and mix.shape[0] < mix.shape[1] and not self.update and not self.num_buckets

    def _padding_part(self, g_all: torch.Tensor, view: HeadView, n: int) -> torch.Tensor:
        """G_pad W_pad summed over TP (T x D): what padded vocabulary columns added to dH. One
        T x D all-reduce per micro-batch, only when the vocabulary is padded."""
        d = view.mix.shape[1] if view.mix is not None else view.basis.shape[1]
        dt = _work_dtype(g_all)
        g_pad = g_all[:, n:].to(dt)
        if g_pad.shape[1]:
            w_pad = view.basis[n:].to(dt)
            if view.mix is not None:
                w_pad = w_pad @ view.mix.to(dt)
            c = g_pad @ w_pad
        else:
            c = torch.zeros(g_all.shape[0], d, dtype=dt, device=g_all.device)
        if get_pg_size(self.tp_group) > 1:
            dist.all_reduce(c, group=self.tp_group)
        return c

    def _bucket_add(self, name, values, pos, rows):
        idx = (pos * self.num_buckets // rows).clamp(max=self.num_buckets - 1)
        acc = torch.zeros(self.num_buckets, dtype=torch.float64, device=values.device).index_add_(0, idx, values)
        cur = getattr(self, name)
        setattr(self, name, acc if cur is None else cur + acc)

    # ------------------------------------------------------------- finalise
    def finalize(self, tp_group=None) -> Dict[str, float]:
        """All-reduce the step's partial sums over TP and return the figures (Python floats)."""
        view = self.view
        if view is None or (self.k is None and self.k_red is None):
            return {}
        k_part = self.k if self.k_red is None else torch.cat([self.k_red.reshape(-1), self.trk.reshape(1)])
        device = k_part.device
        n = view.valid_rows()
        f = view.basis[:n].to(_work_dtype(view.basis))
        ftf = (f.t() @ f).double()  # k x k: V k^2 flops, the largest product of a cheap step
        # Replicated quantities (token sums without SP) are counted on TP rank 0 only, so one SUM
        # all-reduce yields every total.
        own = 1.0 if (self.sequence_parallel or get_pg_rank(tp_group) == 0) else 0.0
        parts = [self.g2.reshape(1).to(device), ftf.reshape(-1).to(device), own * k_part.reshape(-1)]
        if self.num_buckets:
            parts.append(self.g2_buckets.to(device))
        if self.update:
            ppt = self.p @ self.p.t()
            parts += [self.p.square().sum().reshape(1), ppt.reshape(-1), own * self.hth.reshape(-1),
                      own * self.htdh.reshape(-1)]
        flat = torch.cat([p.reshape(-1).to(device) for p in parts])  # NaN/inf propagate into the sums
        if get_pg_size(tp_group) > 1:
            dist.all_reduce(flat, group=tp_group)
        return self._figures(flat, ftf.shape[0], tp_group)

    def _figures(self, flat, k_dim, tp_group) -> Dict[str, float]:
        view = self.view
        it = iter_split(flat)
        g2 = it(1)[0]
        ftf = it(k_dim * k_dim).reshape(k_dim, k_dim)
        if self.k_red is None:
            d = self.k.shape[0]
            k = it(d * d).reshape(d, d)
            trk = torch.trace(k)
        else:  # Q^T K Q; K = Q (Q^T K Q) Q^T exactly, since dH's rows lie in span(Q)
            d = self.k_red.shape[0]
            k, trk = it(d * d).reshape(d, d), it(1)[0]
        g2_buckets = it(self.num_buckets) if self.num_buckets else None
        if self.update:
            p2 = it(1)[0]
            ppt, hth, htdh = (it(d * d).reshape(d, d) for _ in range(3))
        nonfinite = not bool(torch.isfinite(flat).all())
        nan = float("nan")
        if nonfinite:
            out = {key: nan for key in ("grad_norm", "hidden_grad_norm", "destroyed_ratio",
                                        "visible_cosine", "isotropic_baseline", "head_rank")}
            if self.update:
                out["update_cosine"] = nan
            out["nonfinite_grad"] = 1.0
            return out
        mix = view.mix.double().to(ftf.device) if view.mix is not None else None
        rtol = PINV_RTOL
        if self.k_red is not None:  # everything in span(Q): W Q = F (M Q), an r x r problem
            mix = mix @ self.q.double().to(ftf.device)
            # float32 factors put noise of ~eps * lambda_max into F^T F: keep it out of the (r x r) rank
            rtol = max(PINV_RTOL, 8 * d * torch.finfo(view.basis.dtype).eps)
        wtw = ftf if mix is None else mix.t() @ ftf @ mix
        vis2, head_rank, wtw_pinv = _visible_energy(k, ftf, mix, wtw, need_pinv=bool(self.num_buckets), rtol=rtol)
        g2f = float(g2)
        ratio2 = min(max(1.0 - vis2 / g2f, 0.0), 1.0) if g2f > 0 else nan
        out = {
            "grad_norm": g2f ** 0.5,
            "hidden_grad_norm": max(float(trk), 0.0) ** 0.5,
            "destroyed_ratio": ratio2 ** 0.5,
            "visible_cosine": (1.0 - ratio2) ** 0.5,
            "isotropic_baseline": isotropic_baseline(head_rank, view.vocab_size),
            "head_rank": float(head_rank),
            "nonfinite_grad": 0.0,
        }
        if self.num_buckets:
            vis_b = self._vis_buckets(wtw_pinv, tp_group)
            for i in range(self.num_buckets):
                gb = float(g2_buckets[i])
                out[f"destroyed_ratio_bucket{i}"] = (max(0.0, 1 - float(vis_b[i]) / gb) ** 0.5) if gb > 0 else nan
        if self.update:
            inner = float(torch.trace(k)) + float(p2)
            dz2 = float((k * wtw).sum()) + float((hth * ppt).sum()) + 2.0 * float(htdh.square().sum())
            out["update_cosine"] = inner / (g2f ** 0.5 * max(dz2, 0.0) ** 0.5) if dz2 > 0 else nan
        return out

    def _vis_buckets(self, wtw_pinv, tp_group):
        """Per-position-bucket ||G_vis||^2 from the stored dH rows (token sums over TP under SP)."""
        device = wtw_pinv.device
        acc = torch.zeros(self.num_buckets, dtype=torch.float64, device=device)
        offset = get_pg_rank(tp_group) if self.sequence_parallel else 0
        for dh, rows in self.vis_tokens:
            vis_t = ((dh.double() @ wtw_pinv.to(dh.device)) * dh.double()).sum(dim=1)
            batch = dh.shape[0] // rows
            pos = (torch.arange(rows, device=dh.device) + offset * rows).repeat_interleave(batch)
            seq = rows * (get_pg_size(tp_group) if self.sequence_parallel else 1)
            idx = (pos * self.num_buckets // seq).clamp(max=self.num_buckets - 1)
            acc += torch.zeros_like(acc).index_add_(0, idx.to(device), vis_t.to(device))
        if self.sequence_parallel and get_pg_size(tp_group) > 1:
            dist.all_reduce(acc, group=tp_group)
        return acc


def iter_split(flat: torch.Tensor):
    """Consume a flat tensor in pieces: ``take = iter_split(x); a = take(3); b = take(4)``."""
    pos = [0]

    def take(n: int) -> torch.Tensor:
        out = flat[pos[0] : pos[0] + n]
        pos[0] += n
        return out

    return take
