"""Vocab-parallel autograd functions (torch only) for heads whose log-probabilities are not linear in one weight.

Convention (Megatron's f / g pair, extended to forward mode): a tensor is either *replicated* over the
tensor-parallel group (the same value on every rank: the head input h, replicated parameters, a normaliser)
or *sharded* over the vocabulary (this rank's columns: logits, log-probabilities). A replicated tensor's
cotangent is the full one on every rank; a sharded tensor's cotangent is this rank's part.

* :func:`tp_copy`: replicated -> used by sharded code. Forward identity; backward all-reduce (SUM) of the
  cotangent (each rank holds only its vocab shard's part); JVP identity.
* :func:`tp_reduce_sum`: sharded partial sums -> replicated total. Forward all-reduce (SUM); backward identity;
  JVP all-reduce of the tangent.
* :func:`tp_log_softmax`: sharded logits z ``[..., V_local]`` -> sharded log-probabilities
  u = z - lse(z) with lse over the whole vocabulary (every shard). Forward: one MAX and one SUM all-reduce
  of ``[...]`` vectors; backward dz = g - p * allreduce(sum_local g); JVP du = dz - allreduce(sum_local p dz).
  Float32 for 16-bit logits (:func:`softmax_dtype`): z is cast to float32 *before* the max, the exp-sums
  and their all-reduces, as Megatron's ``vocab_parallel_cross_entropy`` does (one float32 copy of the
  logit shard, saved for the backward; the cotangent of z comes back in z's dtype). u is float32 then.

All three are plain torch ops for ``group=None`` (or a group of one rank) and custom
``torch.autograd.Function`` s with ``setup_context`` and ``jvp`` otherwise, so they work under autograd,
``torch.func.vjp`` / ``jvp`` / ``grad`` (not ``vmap``). Every rank of the group must make the same calls (the
same number of tokens): each call is a collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import group_size

__all__ = ["tp_copy", "tp_reduce_sum", "tp_log_softmax", "softmax_dtype"]

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax maths (log-softmax, exp-sums, log-sum-exp) run in for inputs of ``dtype``: float32
    for bf16 / fp16 (Megatron's cross-entropy works in float32 whatever the logits' dtype), else ``dtype``."""
    return torch.float32 if dtype in _SIXTEEN_BIT else dtype



def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None

    @staticmethod
    def jvp(ctx, x_t, _group_t):
        return x_t


class _ReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return _all_reduce(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g, None

    @staticmethod
    def jvp(ctx, x_t, _group_t):
        return _all_reduce(x_t, ctx.group)


def _global_lse(z: torch.Tensor, group) -> torch.Tensor:
    """log sum_i exp(z_i) over the last dim of every shard, ``[..., 1]`` (float ops in z's dtype: the caller
    casts 16-bit z to float32 first)."""
    if z.shape[-1]:
        m = z.detach().amax(dim=-1, keepdim=True)
    else:
        m = z.new_full(z.shape[:-1] + (1,), float("-inf"))
    m = _all_reduce(m, group, dist.ReduceOp.MAX) if group_size(group) > 1 else m
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(z - m).sum(dim=-1, keepdim=True)
    if group_size(group) > 1:
        s = _all_reduce(s, group)
    return m + torch.log(s)


class _LogSoftmax(torch.autograd.Function):
    # Saves z and lse (not the output u): a caller may modify u in place (Megatron's vocab-parallel
    # cross-entropy subtracts the max from the logits it is given).
    @staticmethod
    def forward(z, group):
        lse = _global_lse(z, group)
        return z - lse, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _g_lse):
        z, lse = ctx.saved_tensors
        total = _all_reduce(g.sum(dim=-1, keepdim=True), ctx.group)
        return g - torch.exp(z - lse) * total, None

    @staticmethod
    def jvp(ctx, z_t, _group_t):
        z, lse = ctx.saved_tensors
        mean = _all_reduce((torch.exp(z - lse) * z_t).sum(dim=-1, keepdim=True), ctx.group)
        return z_t - mean, None


def tp_copy(x: torch.Tensor, group=None) -> torch.Tensor:
    """A replicated tensor entering vocab-sharded code (see the module docstring)."""
    return x if group_size(group) == 1 else _Copy.apply(x, group)


def tp_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over the group of each rank's partial ``x`` (a replicated result)."""
    return x if group_size(group) == 1 else _ReduceSum.apply(x, group)


def tp_log_softmax(z: torch.Tensor, group=None) -> torch.Tensor:
    """u = z - log sum_(all shards) exp(z) over the last dim: this rank's columns of the log-softmax, in
    :func:`softmax_dtype` (float32 for 16-bit z: cast before the max / sum all-reduces, never after)."""
    z = z.to(softmax_dtype(z.dtype))
    if group_size(group) == 1:
        return torch.log_softmax(z, dim=-1)
    return _LogSoftmax.apply(z, group)[0]
