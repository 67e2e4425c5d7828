"""Analytic cost of each built-in head kind: parameters and forward FLOPs per token.

For a head with input h ``[D]`` and vocabulary V (the real one; TP padding not counted), per token:

    kind         parameters                      forward FLOPs (2 per multiply-add, matrix products only)
    dense        V D                             2 V D
    low_rank r   r (V + D)                       2 r (D + V)
    mos K        V D + K D^2 + K D               2 K D^2 + 2 K D + 2 K V D
    sigsoftmax   V D                             2 V D
    softcap      V D                             2 V D
    monotone J   V D + 2 J                       2 V D
    stacked D'   V D' + D' D                     2 D' D + 2 V D'
    mfs K, J     V D + (J + K - 1) D^2 + K D     2 (J + K - 1) D^2 + 2 K D + 2 K V D
    mixtape K,S  V D + K D^2 + (K - 1) G D       2 K D^2 + 2 (K - 1) G D + 2 (K - 1) G V + 2 K V D
                 + (S + 1)(K - 1)(G + 1)         (gate logits counted for every word: shared ones repeat)
    decoupled D' V D' + D' D                     2 D' D + 2 V D'

The softmax, log-sum-exp and pointwise maps (O(V) or O(K V) per token) are not counted; a training step
(forward + backward) is about 3x the forward figure. A registered kind without a cost function
(:func:`register_head_cost`) has none (reported as n/a).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..base.head import HEADS, HeadConfig, HeadCost, HeadRegistry

__all__ = ["HeadCost", "head_cost", "register_head_cost", "BUILTIN_COSTS"]


def register_head_cost(kind: str, fn: Callable[[Any, int, int], HeadCost],
                       registry: Optional[HeadRegistry] = None) -> None:
    """Set ``fn(options, D, V) -> HeadCost`` as the cost of a registered head kind (or give ``cost=`` to
    :func:`~megatron_bottleneck.base.head.register_head`)."""
    (registry or HEADS).get(kind).cost = fn


def head_cost(head: HeadConfig, hidden_size: int, vocab_size: int,
              registry: Optional[HeadRegistry] = None) -> Optional[HeadCost]:
    """The cost of ``head`` with input width D = ``hidden_size`` over V = ``vocab_size``; None for a kind
    without a cost function. Bad options raise :class:`~megatron_bottleneck.base.errors.HeadConfigError`."""
    spec = head.spec(registry)
    return None if spec.cost is None else spec.cost(spec.make_options(head.options), int(hidden_size),
                                                     int(vocab_size))


def _linear(o, d, v):
    return HeadCost(v * d, 2 * v * d)


def _low_rank(o, d, v):
    return HeadCost(o.r * (v + d), 2 * o.r * (d + v))


def _mos(o, d, v):
    k = o.k
    return HeadCost(v * d + k * d * d + k * d, 2 * k * d * d + 2 * k * d + 2 * k * v * d)


def _monotone(o, d, v):
    return HeadCost(v * d + 2 * o.terms, 2 * v * d)


def _stacked(o, d, v):
    w = o.width or 2 * d
    return HeadCost(v * w + w * d, 2 * w * d + 2 * v * w)


def _mfs(o, d, v):
    k, f = o.k, o.partitions + o.k - 1
    return HeadCost(v * d + f * d * d + k * d, 2 * f * d * d + 2 * k * d + 2 * k * v * d)


def _mixtape(o, d, v):
    k, g, s = o.k, o.gate_width or d, min(o.frequent, v)
    params = v * d + k * d * d + (k - 1) * g * d + (s + 1) * (k - 1) * (g + 1)
    return HeadCost(params, 2 * k * d * d + 2 * (k - 1) * g * d + 2 * (k - 1) * g * v + 2 * k * v * d)


def _decoupled(o, d, v):
    w = o.width or 2 * d
    return HeadCost(v * w + w * d, 2 * w * d + 2 * v * w)


BUILTIN_COSTS = {"dense": _linear, "sigsoftmax": _linear, "softcap": _linear, "low_rank": _low_rank, "mos": _mos,
                 "monotone": _monotone, "stacked": _stacked, "mfs": _mfs, "mixtape": _mixtape,
                 "decoupled": _decoupled}
"""The built-in kinds' cost functions (the table above), given to their specs by ``heads/builtin.py``."""
