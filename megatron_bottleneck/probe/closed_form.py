"""The closed-form strategy: heads whose logits are linear in their weight (``probe_view``: dense, low-rank, ...).

Per probed micro-batch the head's forward hook registers tensor hooks so the backward pass hands over:

* unfused head (logits exist): the logit gradient G (its vocab shard) and dL/dH at the head input;
* fused head + loss (:class:`~megatron_bottleneck.base.head.LMHead` with a
  :class:`~megatron_bottleneck.base.loss.FusedLossRecord`): dL/dloss_t, from which the fused pass's statistics
  give ||dL/dz_t||^2 exactly (no logits), and dL/dH. Update and rank figures need G itself: the probe
  recomputes it (:func:`megatron_bottleneck.ops.logit_grad_rows`) for a *token slice* of each micro-batch, at most
  ``slice_memory_mib`` of float32 ``[tokens, V/tp]``, so a probed step stays within the fused path's memory.

The sums (:class:`~.stats.StepAccumulator`, the fused update slice's, the rank figures'
:class:`~.spectrum.GramAccumulator`) are local work; the one collective in a hook, the padding correction of an
unfused head over a padded vocabulary, is entered by every TP rank whatever happened before it, as is the SP
all-gather of the head input for the update figures. At the step's close each part's local payload goes to the
front's reduction; the figures follow on the device (:meth:`~.stats.StepAccumulator.figures`: its per-bucket
all-reduce under SP), then on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.utils import get_pg_size

from ..base.head import HeadView, head_view, is_lm_head
from ..base.loss_spec import softcap_slope
from ..ops.linear_cross_entropy import logit_grad_rows, slice_rows
from .spectrum import GramAccumulator
from .stats import StepAccumulator
from .strategy import ClosedStep, MicroBatch, Plan, ProbeHost, Shape, gathered

__all__ = ["ClosedFormStrategy"]


@dataclass
class _State:
    """A closed step's accumulators (the cheap/update one, the fused update slice's, the Gram)."""

    acc: Optional[StepAccumulator]
    slice_acc: Optional[StepAccumulator]
    gram: Optional[GramAccumulator]
    gram_tokens: int
    sequence_parallel: bool
    acc_names: List[str] = field(default_factory=list)


class ClosedFormStrategy:
    """:class:`~.strategy.ProbeStrategy` for linear heads (the module docstring)."""

    kind = "linear"
    keeps_fused_record = True

    def __init__(self, host: ProbeHost):
        self.host = host
        self.shape: Optional[Shape] = None
        self._acc: Optional[StepAccumulator] = None
        self._slice: Optional[StepAccumulator] = None
        self._gram: Optional[GramAccumulator] = None

    def _view(self, head, weight=None) -> HeadView:
        return head_view(head, weight, self.host.config.vocab_size)

    def measure_shape(self, head, weight) -> Shape:
        view = self._view(head, weight)
        k, v_local = view.factor.shape[1], view.factor.shape[0]
        d = k if view.mix is None else view.mix.shape[1]
        self.shape = Shape(k=k, d=d, r=None if view.mix is None else view.mix.shape[0], v_local=v_local,
                           padded=view.vocab_size < get_pg_size(self.host.tp_group) * v_local)
        return self.shape

    def new_plan(self, cheap: bool, update: bool, rank: bool) -> Plan:
        # a Gram spanning steps continues until its token budget is full
        return Plan(cheap=cheap, update=update, rank=rank or (self._gram is not None and not self._gram.full))

    # ------------------------------------------------------------- accumulate
    def forward(self, module, args, kwargs, output, plan: Plan) -> None:
        host, cfg, shape = self.host, self.host.config, self.shape
        hidden = args[0] if args else kwargs["input_"]
        record = getattr(module, "last_loss", None) if is_lm_head(module) else None
        ctx = getattr(module, "loss_context", None)  # an MTP depth's fused output is record.loss as [s, b, 1]
        fused = record is not None and (record.loss is output or (ctx is not None and ctx.output is output))
        plan.fused = fused
        if is_lm_head(module):
            module.last_loss = None  # the record lives in this micro-batch's hooks only
        rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
        mb = MicroBatch(fused=fused, rows=rows, record=record, opened=host._opened)
        if fused and (plan.update or plan.rank):
            mb.slice_rows = min(rows, slice_rows(int(cfg.slice_memory_mib * 2 ** 20), shape.v_local))
        tp = get_pg_size(host.tp_group)
        sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
        plan.sequence_parallel = sp
        if plan.rank:
            if self._gram is None:
                self._gram = GramAccumulator(cfg.rank_token_budget)
            full_rows = mb.slice_rows if fused else rows * (tp if sp else 1)
            mb.gram_rows = self._gram.take(full_rows)
            self._gram.tokens += mb.gram_rows  # counted here, the same on every rank, whatever fails later
        watch_hidden = (plan.cheap or plan.update) and hidden.requires_grad
        plan.watch_hidden = mb.watch_hidden = watch_hidden
        # Collectives first and unconditionally (every TP rank takes the same branch).
        if plan.update:
            mb.full_hidden = gathered(host, hidden, sp)
        mb.hidden = hidden.detach()
        mb.pending = 1 + int(watch_hidden)
        target = record.loss if fused else output
        target.register_hook(lambda g: self._on_output_grad(g, mb, sp))
        if watch_hidden:
            hidden.register_hook(lambda dh: self._on_hidden_grad(dh, mb))
        host._try(self._prepare, module, kwargs.get("weight"), mb, plan, sp, watch_hidden)
        if not fused and mb.view is not None and mb.view.softcap is not None:
            # a copy: Megatron's cross-entropy subtracts the row max from its input in place (one logit-sized
            # tensor on a probed unfused step of a capped head, released by the hook)
            mb.capped = output.detach().clone()

    def _prepare(self, module, weight, mb: MicroBatch, plan: Plan, sp: bool, watch_hidden: bool) -> None:
        mb.view = self._view(module, weight)
        if watch_hidden and self._acc is None:
            self._acc = StepAccumulator(update=plan.update and not mb.fused, sequence_parallel=sp,
                                        num_buckets=self.host.config.num_buckets, tp_group=self.host.tp_group)
        if mb.fused and plan.update and watch_hidden and self._slice is None:
            # the slice's token sums live on TP rank 0 (its first rows are rank 0's under SP too): no SP sums
            self._slice = StepAccumulator(update=True, sequence_parallel=False, tp_group=self.host.tp_group,
                                          padding=False)

    def _on_output_grad(self, grad, mb: MicroBatch, sp: bool) -> None:
        """dL/dlogits (unfused: G's vocab shard [s, b, V/tp], taken through a softcapped head's cap to its linear
        logits, where the fused path takes it) or dL/dloss_t (fused: [s, b])."""
        host = self.host
        with host._timed():
            if mb.fused:
                host._try(self._fused_output_grad, grad, mb)
            else:
                if mb.capped is not None:  # G at the linear logits z, through the cap (as the fused path's)
                    grad = grad.float() * softcap_slope(mb.capped.float(), mb.view.softcap)
                    mb.capped = None
                e = host._try(self._unfused_output_grad, grad, mb)
                if self.shape.padded and mb.watch_hidden:
                    # padding correction: every TP rank enters this one collective, zeros if it failed
                    if e is None:
                        e = torch.zeros(grad.reshape(-1, grad.shape[-1]).shape[0], self.shape.k,
                                        dtype=torch.float32, device=grad.device)
                    e = StepAccumulator.reduce_padding(e, host.tp_group, sp)
                    host._try(lambda: self._acc.push_padding(e))
                if mb.gram_rows and self._gram is not None:
                    host._try(self._gram.add, grad, mb.view, mb.gram_rows)
            host._microbatch_hook_done(mb)

    def _unfused_output_grad(self, grad, mb: MicroBatch):
        acc = self._acc
        if acc is None:
            return None
        acc.add_logit_grad(grad, mb.view, mb.full_hidden if acc.update else None, padding=False)
        return acc.padding_local(grad, mb.view) if self.shape.padded else None

    def _fused_output_grad(self, grad_out, mb: MicroBatch) -> None:
        rec = mb.record
        # G is the gradient at the head's own logits z (what the unfused probe hooks), and the fused pass ran
        # on c z (MuP's output multiplier c = logit_scale, folded into its input): dL/dz = c dL/d(cz), i.e.
        # dL/dloss_t scaled by c in both the norms (c^2 ||.||^2) and the update slice's rows, as dL/dH carries c
        grad_out = grad_out * rec.logit_scale if rec.logit_scale != 1.0 else grad_out
        if self._acc is not None:
            self._acc.add_logit_sq_norms(rec.stats.logit_grad_sq_norm(grad_out), mb.view)
        n = mb.slice_rows
        if not n or (self._slice is None and not mb.gram_rows):
            return
        st = rec.stats
        g = logit_grad_rows(rec.input.reshape(-1, rec.input.shape[-1])[:n], rec.weight, rec.labels.reshape(-1)[:n],
                            st.lse.reshape(-1)[:n], grad_out.reshape(-1)[:n], vocab_start=rec.vocab_start,
                            vocab_size=rec.vocab_size, loss_spec=st.loss_spec(), bias=rec.bias)
        if self._slice is not None:
            self._slice.add_logit_grad(g, mb.view, mb.full_hidden.reshape(-1, mb.full_hidden.shape[-1])[:n],
                                       padding=False)
        if mb.gram_rows and self._gram is not None:
            self._gram.add(g, mb.view, mb.gram_rows)

    def _on_hidden_grad(self, hidden_grad, mb: MicroBatch) -> None:
        with self.host._timed():
            self.host._try(self._hidden_grad, hidden_grad, mb)
            self.host._microbatch_hook_done(mb)

    def _hidden_grad(self, hidden_grad, mb: MicroBatch) -> None:
        if self._acc is not None:
            self._acc.add_hidden_grad(hidden_grad, mb.hidden if self._acc.update else None)
        if self._slice is not None and mb.slice_rows:
            n = mb.slice_rows
            d = hidden_grad.shape[-1]
            self._slice.add_hidden_grad(hidden_grad.reshape(-1, d)[:n], mb.hidden.reshape(-1, d)[:n])

    # ------------------------------------------------------------- reduce
    def has_payload(self, plan: Plan) -> bool:
        return plan.watch_hidden or (self._gram is not None and self._gram.full)

    def _sizes(self, plan: Plan, gram_tokens: int) -> Tuple[int, int, int]:
        """Lengths of the payload's parts, from shapes and the plan alone (a failed rank knows them too)."""
        s, nb = self.shape, self.host.config.num_buckets
        acc = slice_ = 0
        if plan.watch_hidden:
            acc = StepAccumulator.payload_size(s.k, s.d, s.r, nb, plan.update and not plan.fused)
            if plan.fused and plan.update:
                slice_ = StepAccumulator.payload_size(s.k, s.d, s.r, 0, True)
        return acc, slice_, gram_tokens * gram_tokens

    def close(self, plan: Plan, step: int) -> ClosedStep:
        gram = self._gram if (self._gram is not None and self._gram.full) else None
        gram_tokens = gram.tokens if gram is not None else 0
        payload = self.host._try(self._local_payload, plan, gram)
        state = _State(acc=self._acc, slice_acc=self._slice, gram=gram, gram_tokens=gram_tokens,
                       sequence_parallel=plan.sequence_parallel)
        self._acc = self._slice = None
        if gram is not None:
            self._gram = None
        return ClosedStep(step=step, sizes=self._sizes(plan, gram_tokens), payload=payload, state=state)

    def _local_payload(self, plan: Plan, gram: Optional[GramAccumulator]) -> torch.Tensor:
        empty = torch.zeros(0, dtype=torch.float64)
        parts = [self._acc.local_payload() if (plan.cheap or plan.update) and self._acc is not None else empty,
                 self._slice.local_payload() if self._slice is not None else empty,
                 gram.local_payload() if gram is not None else empty]
        device = next((p.device for p in parts if p.numel()), torch.device("cpu"))
        return torch.cat([p.to(device) for p in parts])

    # ------------------------------------------------------------- finalise
    def matching_collectives(self, closed: ClosedStep) -> None:
        st, host = closed.state, self.host
        if st is None or (st.acc is not None and st.acc.buckets_reduced):
            return
        if host.config.num_buckets and st.sequence_parallel and get_pg_size(host.tp_group) > 1 and closed.sizes[0]:
            dist.all_reduce(torch.zeros(host.config.num_buckets, dtype=torch.float64, device=host._device()),
                            group=host.tp_group)

    def device_figures(self, closed: ClosedStep, flat: torch.Tensor):
        st = closed.state
        p_acc, p_slice, p_gram = torch.split(flat, list(closed.sizes))
        names, scalars = [], []
        if closed.sizes[0]:
            fig = st.acc.figures(p_acc)
            st.acc_names = list(fig)
            names += st.acc_names
            scalars += [fig[n] for n in st.acc_names]
        if closed.sizes[1]:
            fig = st.slice_acc.figures(p_slice)
            names += ["update_cosine", "_slice_finite"]
            scalars += [fig["update_cosine"], fig["_finite"]]
        vec = torch.stack([t.reshape(()).double() for t in scalars]) if scalars else \
            torch.zeros(0, dtype=torch.float64, device=flat.device)
        if closed.sizes[2]:
            names.append("_gram_finite")
            vec = torch.cat([vec, torch.isfinite(p_gram).all().double().reshape(1),
                             st.gram.eigenvalues(p_gram, st.gram_tokens)])
        return names, vec

    def host_figures(self, closed: ClosedStep, names: List[str], host: torch.Tensor) -> Dict:
        st, cfg, n = closed.state, self.host.config, len(names)
        values = dict(zip(names, host[:n].tolist()))
        out: Dict = {}
        if closed.sizes[0]:
            out.update(st.acc.host_figures({k: values[k] for k in st.acc_names}))
        if closed.sizes[1]:
            ok = values["_slice_finite"] >= 1.0
            out["update_cosine"] = values["update_cosine"] if ok else float("nan")
            out["update_tokens"] = float(st.slice_acc.tokens if st.slice_acc is not None else 0)
        if closed.sizes[2]:
            kw = {"rtol": cfg.rank_rtol, "energy_ks": tuple(cfg.energy_ks), "residual_ranks": (2 * self.shape.d,)}
            out.update(st.gram.host_figures(host[n:], st.gram_tokens, values["_gram_finite"] >= 1.0, **kw))
        return out

    # ------------------------------------------------------------- state
    def reset(self) -> None:
        self._acc = self._slice = self._gram = None

    def state_dict(self) -> Optional[Dict]:
        return None if self._gram is None else self._gram.state_dict()

    def load_state_dict(self, state: Optional[Dict], device: torch.device) -> None:
        self._gram = None if state is None else GramAccumulator.from_state_dict(state, device)
