"""The probe's math under vocab-parallel TP=2 (two gloo ranks) equals the single-process figures."""
import functools

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.head import HeadView
from megatron_bottleneck.probe import GramAccumulator, StepAccumulator
from tests.unit.test_probe_math import brute, logit_grad


def _tp2_shards(seed):
    import torch.distributed as dist

    rank = dist.get_rank()
    T, V, D, real = 24, 64, 8, 61
    G = logit_grad(T, V, seed=seed).float()
    W = torch.randn(V, D, generator=torch.Generator().manual_seed(seed + 1))
    rows = V // 2
    view = HeadView(W[rank * rows:(rank + 1) * rows], None, rank * rows, real)
    acc = StepAccumulator(tp_group=dist.group.WORLD)
    g_local = G[:, rank * rows:(rank + 1) * rows]
    acc.add_logit_grad(g_local, view)
    acc.add_hidden_grad(G @ W)  # the backward's dL/dH: already summed over vocab shards
    gram = GramAccumulator(token_budget=T)
    gram.add(g_local, view)
    return acc.finalize(dist.group.WORLD), gram.finalize(dist.group.WORLD)


def test_tensor_parallel_equals_single_process():
    results = mb.launch(functools.partial(_tp2_shards, 21), 2)
    G = logit_grad(24, 64, seed=21).float().double()
    W = torch.randn(64, 8, generator=torch.Generator().manual_seed(22)).double()
    want = brute(G[:, :61], W[:61])
    one_gram = GramAccumulator(token_budget=24)
    one_gram.add(G[:, :61].float(), HeadView(W[:61].float(), None, 0, 61))
    want_rank = one_gram.finalize()
    for cheap, rank in results:
        assert cheap["destroyed_ratio"] == pytest.approx(want["destroyed_ratio"], rel=1e-5)
        assert cheap["hidden_grad_norm"] == pytest.approx(want["hidden_grad_norm"], rel=1e-5)
        assert rank["numerical_rank"] == want_rank["numerical_rank"]
        assert rank["effective_rank"] == pytest.approx(want_rank["effective_rank"], rel=1e-6)


