"""The CG strategy: non-linear heads (:class:`~megatron_bottleneck.base.head.NonLinearHead`, no ``probe_view``:
mos, sigsoftmax, stacked, mixtape, ...), measured through the head's ``log_prob_fn`` (the math: :mod:`.general`).

The forward hook keeps a token sample, the first ``general_tokens`` rows of the step (head input over the full
sequence ``[n, D]``, all-gathered under SP; on the fused path also the labels from the head's ``loss_context``),
and hooks the head's output: unfused, dL/du ``[s, b, V/tp]`` (u = log p; this rank's real columns of the sample's
rows are kept, ``[n, n_valid]``); fused, dL/dloss_t ``[s, b]``, with G = dL/dloss_t (p - q) rebuilt from the
labels. After the step's last backward (before any optimizer step) :func:`.general.head_sums` runs
``general_iterations`` CG iterations, each a JVP and a VJP through ``log_prob_fn`` (TP collectives inside, a fixed
number: every TP rank enters them, with zeros where its probe work failed, on the healthy ranks' branch: labels on
the fused path; local work between them is guarded by ``errors``, so a failure mid-CG still makes the remaining
collectives), and gives the sums (visible energy, ||G||^2, max residual, update inner product and norm), the same
on every TP rank: TP rank 0 puts them in the payload, the others zeros. Figures: ``grad_norm``,
``destroyed_ratio``, ``visible_cosine``, ``cg_residual``, ``update_cosine`` (update steps), ``probe_tokens``, all
describing the sample. No rank figures. (An exception inside the head's own ``log_prob_fn`` between two of its
collectives cannot be repaired from outside it.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from megatron.core.utils import get_pg_rank, get_pg_size

from ..base.errors import HeadConfigError
from .general import SUM_NAMES, figures_from_sums, head_sums
from .strategy import ClosedStep, MicroBatch, Plan, ProbeHost, Shape, gathered

log = logging.getLogger(__name__)

__all__ = ["CGStrategy"]


@dataclass
class _State:
    cheap: bool
    update: bool
    names: List[str] = field(default_factory=list)


class CGStrategy:
    """:class:`~.strategy.ProbeStrategy` for non-linear heads (the module docstring)."""

    kind = "general"
    keeps_fused_record = False

    def __init__(self, host: ProbeHost, head: torch.nn.Module):
        if not callable(getattr(head, "log_prob_fn", None)) or not hasattr(head, "head_input_size"):
            raise HeadConfigError(
                f"the gradient probe cannot measure the {type(head).__name__} head: it has no probe_view "
                f"(linear head) and no log_prob_fn / head_input_size (non-linear head; see "
                f"megatron_bottleneck.base.head.NonLinearHead): implement one, or turn the probe off")
        if host.config.rank_interval:
            log.warning("GradientProbe: rank figures (probe.rank_interval) are measured for linear heads only; "
                        "the %s head gets the general figures, no rank figures", type(head).__name__)
        self.host, self.head = host, head
        self.shape: Optional[Shape] = None
        self._log_prob = None  # from the first forward: its collectives, for a step where building it fails
        self._samples: List[Dict] = []
        self._taken = 0  # tokens of the step's sample, counted from shapes alone (the same on every rank)
        self._active = False  # a forward of the step took part
        self._logit_scale = 1.0  # the fused loss's multiplier of the head's logits (MuP's output multiplier)
        self._sample_dtype: Optional[torch.dtype] = None  # the head input's (zeros of it where work failed)

    def measure_shape(self, head, weight) -> Shape:
        lp = head.log_prob_fn()
        self._log_prob = lp
        d = int(head.head_input_size)
        self.shape = Shape(k=d, d=d, r=None, v_local=int(lp.n_valid), padded=False)
        return self.shape

    def new_plan(self, cheap: bool, update: bool, rank: bool) -> Plan:
        self.reset()
        return Plan(cheap=cheap, update=update, rank=False)

    # ------------------------------------------------------------- accumulate
    def forward(self, module, args, kwargs, output, plan: Plan) -> None:
        """A micro-batch's share of the step's token sample (the head input's first rows over the full sequence,
        all-gathered under SP: a collective every TP rank enters, the count following from shapes alone), the
        labels on the fused path (``loss_context``), and one hook on the output (dL/du ``[s, b, V/tp]`` unfused;
        dL/dloss_t ``[s, b]`` fused)."""
        host = self.host
        hidden = args[0] if args else kwargs["input_"]
        ctx = getattr(module, "loss_context", None)
        fused = ctx is not None and ctx.output is output
        tp = get_pg_size(host.tp_group)
        sp = bool(getattr(module, "sequence_parallel", False)) and tp > 1
        plan.fused, plan.sequence_parallel, self._active = fused, sp, True
        self._logit_scale = float(ctx.logit_scale) if fused else 1.0
        self._sample_dtype = hidden.dtype
        # from shapes alone, before anything that can fail: the same count on every rank
        rows = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
        n = max(0, min(rows * (tp if sp else 1), host.config.general_tokens - self._taken))
        self._taken += n
        mb = MicroBatch(fused=fused, rows=rows, pending=1, opened=host._opened)
        if n:
            full = gathered(host, hidden, sp)  # under SP a collective: entered on every rank
            mb.record = host._try(self._take_sample, full, n, ctx if fused else None)
        output.register_hook(lambda g: self._on_grad(g, mb))

    def _take_sample(self, full: torch.Tensor, n: int, ctx) -> Dict:
        """This micro-batch's share of the step's token sample (local work): the first ``n`` rows of the head
        input ``[n, D]`` and, fused (``ctx`` the head's loss context), their labels."""
        sample = {"n": n, "hidden": full.reshape(-1, full.shape[-1])[:n].clone()}
        if ctx is not None:
            labels = ctx.labels if ctx.call_labels is None else ctx.call_labels  # an MTP depth's own labels
            sample["labels"] = labels.reshape(-1)[:n].clone()
            sample["spec"] = ctx.config.loss_spec()
        self._samples.append(sample)
        return sample

    def _on_grad(self, grad, mb: MicroBatch) -> None:
        with self.host._timed():
            if mb.record is not None:
                self.host._try(self._keep_grad, grad, mb)
            self.host._microbatch_hook_done(mb)

    def _keep_grad(self, grad, mb: MicroBatch) -> None:
        """Keep the sample's rows of the output gradient: dL/dloss_t (fused) or this rank's real columns of
        dL/du (unfused; a gathered output's columns are cut to this rank's shard)."""
        sample, n = mb.record, mb.record["n"]
        if mb.fused:
            sample["scale"] = grad.reshape(-1)[:n].detach().clone()
            return
        g = grad.reshape(-1, grad.shape[-1])[:n]
        n_valid = self.shape.v_local
        per_rank = int(getattr(self.head, "output_size_per_partition", g.shape[-1]))
        start = 0 if g.shape[-1] <= per_rank else get_pg_rank(self.host.tp_group) * per_rank
        sample["grad"] = g[:, start:start + n_valid].detach().clone()

    # ------------------------------------------------------------- reduce
    def has_payload(self, plan: Plan) -> bool:
        return self._active

    def close(self, plan: Plan, step: int) -> ClosedStep:
        sums = self._sums(plan)  # collectives: on every rank, first
        payload = self.host._try(self._payload, sums)
        self.reset()
        return ClosedStep(step=step, sizes=(len(SUM_NAMES),), payload=payload,
                          state=_State(cheap=plan.cheap, update=plan.update))

    @staticmethod
    def _payload(sums: Optional[torch.Tensor]) -> torch.Tensor:
        if sums is None:
            raise RuntimeError("the general probe's sums are missing")
        return sums.double()

    def _inputs(self, plan: Plan):
        samples = self._samples
        h = torch.cat([s["hidden"] for s in samples])
        if plan.fused:
            return h, {"labels": torch.cat([s["labels"] for s in samples]),
                       "scale": torch.cat([s["scale"] for s in samples]),
                       "loss_spec": samples[0]["spec"], "logit_scale": self._logit_scale}
        return h, {"grad": torch.cat([s["grad"] for s in samples])}

    def _sums(self, plan: Plan) -> Optional[torch.Tensor]:
        """:func:`.general.head_sums` of the step's token sample, before any optimizer step: run on every TP rank
        with the same token count and iterations (its JVP / VJP collectives), with zeros on a rank whose
        probe work failed this step. The sums are the same on every TP rank, so only TP rank 0 puts them in the
        payload (zeros elsewhere: the SUM all-reduce of ``end_step`` then gives them once)."""
        host, cfg, n = self.host, self.host.config, self._taken
        try:
            lp = self.head.log_prob_fn()
        except Exception as exc:  # the one taken at the first forward: its collectives, values irrelevant now
            host._fail(exc)
            lp = self._log_prob
        got = host._try(self._inputs, plan)
        if got is not None and got[0].shape[0] == n:
            h, kw = got
        else:  # this rank failed: the same call with zeros of the same shapes and kind (its flag is set)
            host._fail(RuntimeError("the general probe's token sample is incomplete"))
            dev = host._device()
            h = torch.zeros(n, self.shape.d, dtype=self._sample_dtype, device=dev)
            if plan.fused:  # the healthy ranks' labels branch, its collectives included (MuP's normaliser), G = 0
                kw = {"labels": torch.zeros(n, dtype=torch.long, device=dev),
                      "scale": torch.zeros(n, dtype=torch.float64, device=dev), "logit_scale": self._logit_scale}
            else:
                kw = {"grad": torch.zeros(n, self.shape.v_local, dtype=torch.float64, device=dev)}
        errors: List[BaseException] = []  # a failure of local work inside: the collectives go on with zeros
        try:
            sums = head_sums(lp, h, iterations=cfg.general_iterations if plan.cheap else 0, update=plan.update,
                             errors=errors, **kw)
        except Exception as exc:
            host._fail(exc)
            return None
        if errors:
            host._fail(errors[0])
            return None
        return sums * (1.0 if get_pg_rank(host.tp_group) == 0 else 0.0)

    # ------------------------------------------------------------- finalise
    def matching_collectives(self, closed: ClosedStep) -> None:
        return None  # the figures of the sums enter no collective

    def device_figures(self, closed: ClosedStep, flat: torch.Tensor):
        st = closed.state
        fig = figures_from_sums(flat, update=st.update)
        fig["probe_tokens"] = flat[SUM_NAMES.index("tokens")]
        st.names = ["grad_norm"] + (["destroyed_ratio", "visible_cosine", "cg_residual"] if st.cheap else []) \
            + (["update_cosine"] if st.update else []) + ["probe_tokens"]
        return list(st.names), torch.stack([fig[n].reshape(()).double() for n in st.names])

    def host_figures(self, closed: ClosedStep, names: List[str], host: torch.Tensor) -> Dict:
        values = dict(zip(names, host[:len(names)].tolist()))
        return {k: values[k] for k in closed.state.names}

    # ------------------------------------------------------------- state
    def reset(self) -> None:
        self._samples, self._taken, self._active = [], 0, False

    def state_dict(self) -> Optional[Dict]:
        return None  # nothing spans steps

    def load_state_dict(self, state: Optional[Dict], device: torch.device) -> None:
        return None
