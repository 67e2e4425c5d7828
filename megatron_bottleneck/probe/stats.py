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
everywhere: dH is corrected by the padded columns' share G_pad W_pad = E M, E = G_pad F_pad (T x k), formed
on the rank(s) holding padding and summed over TP at width k (all-reduce; reduce-scatter to the sequence
shards under sequence parallelism), once per micro-batch. (W^T W)^+ is an eigen-pseudo-inverse in float64
with relative cut ``PINV_RTOL``.

Synchronisation. The accumulator does local work only until :meth:`StepAccumulator.local_payload` (a flat
float64 vector of the step's partial sums, no host sync); the caller SUM-all-reduces it over TP (the probe
does so once per recorded step, with its other figures) and :meth:`StepAccumulator.figures` turns the reduced
vector into 0-dim device tensors, with no host sync either; one ``.tolist()`` of them is the step's only
transfer. (The one exception: a Cholesky factor that failed, i.e. a numerically singular F^T F, sends the
figures through an eigen-pseudo-inverse and a second transfer.) :meth:`StepAccumulator.finalize` does all of
it in one call.

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
from .linalg import (PINV_RTOL, isotropic_baseline, iter_split, row_sq_norms, token_visible_energy,
                     visible_energy, visible_energy_pinv, work_dtype)


FIGURE_KEYS = ("grad_norm", "hidden_grad_norm", "destroyed_ratio", "visible_cosine", "isotropic_baseline",
               "head_rank")


class StepAccumulator:
    """Collects one step's micro-batches (local work only) and finalises the figures.

    Call :meth:`add_logit_grad` (or :meth:`add_logit_sq_norms`) with each micro-batch's logit-gradient shard and
    :meth:`add_hidden_grad` with its dL/dH (both from backward hooks), then either :meth:`finalize` once per
    step, or :meth:`local_payload` -> SUM all-reduce over TP -> :meth:`figures` -> one transfer (the probe's
    way). ``sequence_parallel``: dH and H are sequence shards (token sums then add over TP). ``padding``:
    the logit gradients passed in carry Megatron's padded columns, whose share of dH is removed (False for
    gradients formed over the real columns only, e.g. the fused path's).
    """

    def __init__(self, update: bool = False, sequence_parallel: bool = False, num_buckets: int = 0,
                 tp_group=None, padding: bool = True):
        self.tp_group = tp_group
        self.update = update
        self.sequence_parallel = sequence_parallel
        self.num_buckets = num_buckets
        self.padding = padding
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
        self.pad_corrections = []  # per micro-batch E = G_pad F_pad summed over TP (T x k), padded vocabulary only
        self.tokens = 0  # tokens seen by add_hidden_grad (on this rank)
        self.buckets_reduced = False  # the per-bucket all-reduce of figures() has run
        self._mix = None  # M at the end of the step (a copy: the optimizer may change the weights after it)

    # ------------------------------------------------------------ local work
    def padded(self, view: HeadView) -> bool:
        """Whether the gradients of ``view`` carry padded columns this accumulator must correct for (the same
        answer on every TP rank: the padded size is rows x tp)."""
        return self.padding and view.vocab_size < get_pg_size(self.tp_group) * view.factor.shape[0]

    def add_logit_grad(self, grad: torch.Tensor, view: HeadView, hidden_full: Optional[torch.Tensor] = None,
                       padding: bool = True) -> None:
        """grad: [s, b, V_local] (or [T, V_local]) logit gradient shard; hidden_full: [s, b, D] full-sequence
        head input (needed only for update figures). ``padding=False``: the caller runs the padding
        correction's three steps itself (:meth:`padding_local`, :meth:`reduce_padding`, :meth:`push_padding`),
        as the probe does to keep the collective out of anything that can fail."""
        self.view = view
        n = view.valid_rows()
        g = grad.reshape(-1, grad.shape[-1])[:, :n]
        # ||G||^2 = sum_t ||g_t||^2, float64 per row (row_sq_norms: ~1e-7 relative; one float32 norm over a whole
        # T x V chunk is off by ~1e-4 on CPUs). A float64 cast of G would cost 15x more.
        sq = row_sq_norms(g)  # [T]
        self.g2 = self.g2.to(g.device) + sq.sum()
        if self.num_buckets:
            seq = grad.shape[0] if grad.dim() == 3 else g.shape[0]
            batch = g.shape[0] // seq
            pos = torch.arange(seq, device=g.device).repeat_interleave(batch)
            self._bucket_add("g2_buckets", sq, pos, seq)
        if padding and self.padded(view):
            e = self.padding_local(grad, view)
            self.push_padding(self.reduce_padding(e, self.tp_group, self.sequence_parallel))
        if self.update:
            dt = work_dtype(g)
            h = hidden_full.reshape(-1, hidden_full.shape[-1]).to(dt)
            p = h.t() @ g.to(dt)  # D x V_valid
            self.p = p.double() if self.p is None else self.p + p.double()

    def add_logit_sq_norms(self, sq: torch.Tensor, view: HeadView) -> None:
        """A fused head + loss's micro-batch: per-token ||dL/dz_t||^2 ``[s, b]`` (or ``[T]``), already summed over
        vocab shards and without padded columns (the fused pass excludes them from the softmax), instead of
        the logit gradient itself. Update figures need G: not available from this."""
        self.view = view
        # Every TP rank holds the same totals and the reduction sums g2 over TP: count them on TP rank 0 only.
        sq = sq.double() * (1.0 if get_pg_rank(self.tp_group) == 0 else 0.0)
        self.g2 = self.g2.to(sq.device) + sq.sum()
        if self.num_buckets:
            seq = sq.shape[0]
            per_token = sq.reshape(seq, -1)
            pos = torch.arange(seq, device=sq.device).repeat_interleave(per_token.shape[1])
            self._bucket_add("g2_buckets", per_token.reshape(-1), pos, seq)

    def add_hidden_grad(self, hidden_grad: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> None:
        """hidden_grad: dL/dH at the head input, [s(/tp), b, D]; hidden: H of the same shape (update)."""
        dh = hidden_grad.reshape(-1, hidden_grad.shape[-1]).to(work_dtype(hidden_grad))
        self.tokens += dh.shape[0]
        if self.pad_corrections:  # remove the padded columns' share: dH_real = dH - E M
            e = self.pad_corrections.pop(0).to(dh.dtype)
            mix = self.view.mix
            dh = dh - (e if mix is None else e @ mix.to(dh.dtype))
        if self._reduced():
            if self.q is None:
                self.q = torch.linalg.qr(self.view.mix.t().to(dh.dtype))[0]  # D x r, its span contains row(M)
            y = dh @ self.q.to(dh.device)
            k_red, trk = (y.t() @ y).double(), row_sq_norms(dh).sum()  # tr K = ||dH||^2, as ||G||^2
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

    @staticmethod
    def reduced_rank(r: Optional[int], d: int, update: bool, num_buckets: int) -> Optional[int]:
        """r when K is kept as Q^T K Q (r x r): a low-rank head's mix (r < D) and neither update figures nor
        buckets (they use the full D x D products); else None."""
        return r if (r is not None and r < d and not update and not num_buckets) else None

    def _reduced(self) -> bool:
        mix = self.view.mix if self.view is not None else None
        return mix is not None and self.reduced_rank(mix.shape[0], mix.shape[1], self.update,
                                                     self.num_buckets) is not None

    @staticmethod
    def padding_local(grad: torch.Tensor, view: HeadView) -> torch.Tensor:
        """E_local = G_pad F_pad ``[T, k]`` float32 on a rank holding padded rows (zeros elsewhere): what this
        rank's padded vocabulary columns added to dH is E M."""
        g_all = grad.reshape(-1, grad.shape[-1])
        n = view.valid_rows()
        e = torch.zeros(g_all.shape[0], view.factor.shape[1], dtype=torch.float32, device=g_all.device)
        if g_all.shape[1] > n:
            torch.mm(g_all[:, n:].float(), view.factor[n:].float(), out=e)
        return e

    @staticmethod
    def reduce_padding(e: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
        """E summed over TP at width k: all-reduce, or reduce-scatter to this rank's sequence shard
        ``[T/tp, k]`` under sequence parallelism (one collective per micro-batch, padded vocabulary only)."""
        world = get_pg_size(tp_group)
        if world == 1:
            return e
        if sequence_parallel:
            out = torch.empty(e.shape[0] // world, e.shape[1], dtype=e.dtype, device=e.device)
            dist.reduce_scatter_tensor(out, e.contiguous(), group=tp_group)
            return out
        dist.all_reduce(e, group=tp_group)
        return e

    def push_padding(self, e: torch.Tensor) -> None:
        """Queue a micro-batch's reduced E; :meth:`add_hidden_grad` subtracts E M from that micro-batch's dH."""
        self.pad_corrections.append(e)

    def _bucket_add(self, name, values, pos, rows):
        idx = (pos * self.num_buckets // rows).clamp(max=self.num_buckets - 1)
        acc = torch.zeros(self.num_buckets, dtype=torch.float64, device=values.device).index_add_(0, idx, values)
        cur = getattr(self, name)
        setattr(self, name, acc if cur is None else cur + acc)

    # ------------------------------------------------------------- finalise
    @classmethod
    def payload_size(cls, k: int, d: int, r: Optional[int], num_buckets: int, update: bool) -> int:
        """Length of :meth:`local_payload` for a head of basis width k, input width d and mix rows r (None: dense),
        known on every rank without any data (a rank that failed sends zeros of it)."""
        reduced = cls.reduced_rank(r, d, update, num_buckets)
        size = 1 + k * k + ((reduced * reduced + 1) if reduced else d * d) + num_buckets
        return size + (1 + 3 * d * d if update else 0)

    def layout(self):
        """(k, d, reduced rank or None) of the payload this accumulator builds."""
        view = self.view
        mix = view.mix
        d = view.factor.shape[1] if mix is None else mix.shape[1]
        return view.factor.shape[1], d, (mix.shape[0] if self._reduced() else None)

    def ready(self) -> bool:
        return self.view is not None and (self.k is not None or self.k_red is not None)

    def local_payload(self, weight_share: float = 1.0) -> torch.Tensor:
        """This rank's partial sums of the step, flat float64 (device work only): ||G||^2, F^T F, K (or Q^T K Q
        and tr K), the bucket sums, and for update figures ||P||^2, P P^T, H^T H, H^T dH. Replicated token
        sums (without SP) are counted on TP rank 0 only, so one SUM all-reduce yields every total.
        ``weight_share`` multiplies F^T F: a caller that also sums the payload over data-parallel ranks (each
        holding the same weights and its own tokens, e.g. ``megatron-bottleneck measure``) passes 1 on one of
        them and 0 on the others."""
        view = self.view
        k_part = self.k if self.k_red is None else torch.cat([self.k_red.reshape(-1), self.trk.reshape(1)])
        device = k_part.device
        n = view.valid_rows()
        f = view.factor[:n].to(work_dtype(view.factor))
        ftf = (f.t() @ f).double() * weight_share  # k x k: V k^2 flops, the largest product of a cheap step
        own = 1.0 if (self.sequence_parallel or get_pg_rank(self.tp_group) == 0) else 0.0
        parts = [self.g2.reshape(1).to(device), ftf.reshape(-1).to(device), own * k_part.reshape(-1)]
        if self.num_buckets:
            parts.append(self.g2_buckets.to(device))
        if self.update:
            ppt = self.p @ self.p.t()
            parts += [self.p.square().sum().reshape(1), ppt.reshape(-1), own * self.hth.reshape(-1),
                      own * self.htdh.reshape(-1)]
        self._mix = None if view.mix is None else view.mix.detach().double().clone()
        return torch.cat([p.reshape(-1).to(device) for p in parts])  # NaN/inf propagate into the sums

    def figures(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The step's figures as 0-dim float64 device tensors from the TP-reduced payload (no host sync).
        Extra keys: ``_ok`` (the Cholesky fast path held) and ``_finite`` (the payload was finite)."""
        view = self.view
        k_dim, d, reduced = self.layout()
        take = iter_split(flat)
        g2 = take(1)[0]
        ftf = take(k_dim * k_dim).reshape(k_dim, k_dim)
        if reduced is None:
            k = take(d * d).reshape(d, d)
            trk = torch.trace(k)
        else:  # Q^T K Q; K = Q (Q^T K Q) Q^T exactly, since dH's rows lie in span(Q)
            k, trk = take(reduced * reduced).reshape(reduced, reduced), take(1)[0]
        g2_buckets = take(self.num_buckets) if self.num_buckets else None
        mix = self._mix.to(ftf.device) if self._mix is not None else None
        rtol = PINV_RTOL
        if reduced is not None:  # everything in span(Q): W Q = F (M Q), an r x r problem
            mix = mix @ self.q.double().to(ftf.device)
            # float32 factors put noise of ~eps * lambda_max into F^T F: keep it out of the (r x r) rank
            rtol = max(PINV_RTOL, 8 * reduced * torch.finfo(view.factor.dtype).eps)
        wtw = ftf if mix is None else mix.t() @ ftf @ mix
        vis2, head_rank, wtw_pinv, ok = visible_energy(k, ftf, mix, wtw, need_pinv=bool(self.num_buckets), rtol=rtol)
        self._fallback = (k, wtw, rtol)
        out = self._from_energy(g2, trk, vis2, head_rank)
        out["_ok"], out["_finite"] = ok.double(), torch.isfinite(flat).all().double()
        if self.num_buckets:
            vis_b = self._vis_buckets(wtw_pinv, self.tp_group)
            for i in range(self.num_buckets):
                gb = g2_buckets[i]
                out[f"destroyed_ratio_bucket{i}"] = (1 - vis_b[i] / gb).clamp(min=0).sqrt()
        if self.update:
            p2 = take(1)[0]
            ppt, hth, htdh = (take(d * d).reshape(d, d) for _ in range(3))
            inner = torch.trace(k) + p2
            dz2 = (k * wtw).sum() + (hth * ppt).sum() + 2.0 * htdh.square().sum()
            cos = inner / (g2.sqrt() * dz2.clamp(min=0).sqrt())
            out["update_cosine"] = torch.where(dz2 > 0, cos, torch.full_like(cos, float("nan")))
        return out

    def _from_energy(self, g2, trk, vis2, head_rank) -> Dict[str, torch.Tensor]:
        ratio2 = (1.0 - vis2 / g2).clamp(0.0, 1.0)
        return {"grad_norm": g2.clamp(min=0).sqrt(), "hidden_grad_norm": trk.clamp(min=0).sqrt(),
                "destroyed_ratio": ratio2.sqrt(), "visible_cosine": (1.0 - ratio2).sqrt(), "head_rank": head_rank,
                "_g2": g2, "_vis2": vis2}

    def host_figures(self, values: Dict[str, float]) -> Dict[str, float]:
        """Python figures from :meth:`figures`' values after their one transfer (the fallback of a failed
        Cholesky factor runs here, with a second transfer)."""
        nan = float("nan")
        if not values.pop("_finite") >= 1.0:
            out = {key: nan for key in FIGURE_KEYS}
            if self.update:
                out["update_cosine"] = nan
            out["nonfinite_grad"] = 1.0
            return out
        if not values.pop("_ok") >= 1.0:  # numerically singular F^T F or M M^T: the eigen-pseudo-inverse
            k, wtw, rtol = self._fallback
            vis2, rank, _ = visible_energy_pinv(k, wtw, rtol)
            vis2, rank = torch.stack([vis2, rank]).tolist()
            g2 = values["_g2"]
            ratio2 = min(max(1.0 - vis2 / g2, 0.0), 1.0) if g2 > 0 else nan
            values.update(destroyed_ratio=ratio2 ** 0.5, visible_cosine=(1.0 - ratio2) ** 0.5, head_rank=rank)
        g2 = values.pop("_g2")
        values.pop("_vis2")
        if not g2 > 0:
            values["destroyed_ratio"] = values["visible_cosine"] = nan
        values["head_rank"] = float(round(values["head_rank"]))
        values["isotropic_baseline"] = isotropic_baseline(int(values["head_rank"]), self.view.vocab_size)
        values["nonfinite_grad"] = 0.0
        return values

    def finalize(self, tp_group=None) -> Dict[str, float]:
        """All-reduce the step's partial sums over TP and return the figures (Python floats)."""
        if not self.ready():
            return {}
        flat = self.local_payload()
        group = tp_group if tp_group is not None else self.tp_group
        if get_pg_size(group) > 1:
            dist.all_reduce(flat, group=group)
        fig = self.figures(flat)
        names = list(fig)
        return self.host_figures(dict(zip(names, torch.stack([fig[n] for n in names]).tolist())))

    def _vis_buckets(self, wtw_pinv, tp_group):
        """Per-position-bucket ||G_vis||^2 from the stored dH rows (token sums over TP under SP)."""
        device = wtw_pinv.device
        acc = torch.zeros(self.num_buckets, dtype=torch.float64, device=device)
        offset = get_pg_rank(tp_group) if self.sequence_parallel else 0
        for dh, rows in self.vis_tokens:
            vis_t = token_visible_energy(dh, wtw_pinv)
            batch = dh.shape[0] // rows
            pos = (torch.arange(rows, device=dh.device) + offset * rows).repeat_interleave(batch)
            seq = rows * (get_pg_size(tp_group) if self.sequence_parallel else 1)
            idx = (pos * self.num_buckets // seq).clamp(max=self.num_buckets - 1)
            acc += torch.zeros_like(acc).index_add_(0, idx.to(device), vis_t.to(device))
        if self.sequence_parallel and get_pg_size(tp_group) > 1:
            dist.all_reduce(acc, group=tp_group)
            self.buckets_reduced = True
        return acc
