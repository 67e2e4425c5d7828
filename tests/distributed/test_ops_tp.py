"""Fused linear cross-entropy under vocab-parallel TP=2 (two gloo CPU ranks) vs one process.

Each rank holds a vocab shard of the weight; loss, stats and dL/du (summed over ranks, or all-reduced
by the op with reduce_grad_input=True) and the concatenated dL/dweight shards must equal the
single-process reference. Also checks the op against Megatron's own vocab_parallel_cross_entropy.
"""
import pytest
import torch
import torch.distributed as dist

import megatron_bottleneck as mb
from megatron_bottleneck.ops import HeadLossStats, linear_cross_entropy, linear_cross_entropy_reference
from megatron_bottleneck.ops.reference import flat_zipf_problem, gradient_errors, peaked_zipf_problem, unfused_loss

T, K = 40, 16
CASES = {
    # name: (rows of the full weight (padded, even), real vocab, kwargs)
    "plain": (96, 96, dict()),
    "padded": (102, 97, dict(label_smoothing=0.1, z_loss_weight=1e-3)),
    "rank1_all_padding": (112, 50, dict(label_smoothing=0.2)),
}


def data(rows, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(T, K, generator=gen, dtype=torch.float64)
    w = torch.randn(rows, K, generator=gen, dtype=torch.float64) / K**0.25
    y = torch.randint(0, vocab, (T,), generator=gen)
    y[::6] = -100
    g = torch.rand(T, generator=gen, dtype=torch.float64)
    return u, w, y, g


def run_tp_cases():
    """On each rank: every case at chunk sizes 7 and default; returns {(case, chunk, reduce): results}."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, (rows, vocab, kw) in CASES.items():
        u, w, y, g = data(rows, vocab)
        shard = rows // world
        for chunk in (7, None):
            for reduce in (False, True):
                uu = u.float().requires_grad_()
                ww = w[rank * shard:(rank + 1) * shard].float().requires_grad_()
                stats = HeadLossStats()
                loss = linear_cross_entropy(uu, ww, y, tp_group=dist.group.WORLD, vocab_size=vocab,
                                            chunk_size=chunk, stats=stats, reduce_grad_input=reduce, **kw)
                (loss * g.float()).sum().backward()
                out[(name, chunk, reduce)] = dict(
                    loss=loss.detach(), du=uu.grad, dw=ww.grad, g2=stats.logit_grad_sq_norm(g),
                    sum_p2=stats.sum_p2, p_target=stats.p_target)
    return out


BF16_CASES = {  # name: (rows (even), real vocab, ignore_every, kwargs); T=1024, k=64
    "plain": (2048, 2048, 0, dict()),
    "padded_smoothing_z_loss": (2048, 2000, 7, dict(label_smoothing=0.1, z_loss_weight=1e-3)),
}


def run_bf16_cases():
    """bf16 shards on each rank (chunk 256): loss, partial dL/du, dL/dweight shard per case."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, (rows, vocab, ignore, kw) in BF16_CASES.items():
        u, w, y = peaked_zipf_problem(1024, 64, rows, vocab, ignore_every=ignore)
        shard = rows // world
        uu = u.clone().requires_grad_()
        ww = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        loss = linear_cross_entropy(uu, ww, y, tp_group=dist.group.WORLD, vocab_size=vocab, chunk_size=256,
                                    check_labels=False, **kw)
        (loss.double().sum() / int((y != -100).sum())).backward()
        out[name] = dict(loss=loss.detach(), du=uu.grad, dw=ww.grad)
    return out


CHUNKS_PER_SHARD = (1, 2, 7, 64)  # of a 1024-row shard
PROBLEMS = {"flat": flat_zipf_problem, "peaked": peaked_zipf_problem}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_chunked_cases():
    """16-bit shards of a 2048-row vocabulary (T=1024, k=64) at 1, 2, 7 and 64 chunks per shard, flat and
    peaked logits: dL/du as this rank's partial (default) and all-reduced by the op (float32), dL/dW shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for dname, dtype in DTYPES.items():
        for pname, problem in PROBLEMS.items():
            u, w, y = problem(1024, 64, 2048, dtype=dtype)
            shard = 2048 // world
            for chunks in CHUNKS_PER_SHARD:
                for reduce in (False, True):
                    uu = u.clone().requires_grad_()
                    ww = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
                    loss = linear_cross_entropy(uu, ww, y, tp_group=dist.group.WORLD, chunk_size=-(-shard // chunks),
                                                check_labels=False, reduce_grad_input=reduce)
                    (loss.double().sum() / int((y != -100).sum())).backward()
                    out[(dname, pname, chunks, reduce)] = dict(du=uu.grad, dw=ww.grad)
    return out


def run_megatron_comparison(label_smoothing):
    """Megatron's vocab_parallel_cross_entropy on materialised logit shards vs the fused op."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    world = dist.get_world_size()
    mb.initialize_parallel(world)
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    u, w, y, g = data(96, 96, seed=1)
    y = y.clamp(min=0)  # Megatron has no ignore_index
    shard = 96 // world
    res = {}
    for which in ("megatron", "fused"):
        uu = u.float().reshape(10, 4, K).requires_grad_()
        ww = w[rank * shard:(rank + 1) * shard].float().requires_grad_()
        labels = y.reshape(10, 4)
        if which == "megatron":
            loss = vocab_parallel_cross_entropy(uu @ ww.t(), labels, label_smoothing)
        else:
            loss = linear_cross_entropy(uu, ww, labels, tp_group=group, label_smoothing=label_smoothing, chunk_size=16)
        (loss * g.float().reshape(10, 4)).sum().backward()
        res[which] = (loss.detach(), uu.grad, ww.grad)
    return res


@pytest.fixture(scope="module")
def tp2():
    return mb.launch(run_tp_cases, 2)


@pytest.fixture(scope="module")
def tp2_chunked():
    return mb.launch(run_chunked_cases, 2)


@pytest.fixture(scope="module")
def tp2_bf16():
    return mb.launch(run_bf16_cases, 2)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tp2_equals_single_process_reference(tp2, name, chunk, reduce):
    rows, vocab, kw = CASES[name]
    u, w, y, g = data(rows, vocab)
    uu, ww = u.clone().requires_grad_(), w.clone().requires_grad_()
    logits = []
    ref = linear_cross_entropy_reference(uu, ww, y, vocab_size=vocab, logits_out=logits, **kw)
    (ref * g).sum().backward()
    ref_g2 = logits[0].grad.square().sum(1)
    r0, r1 = tp2[0][(name, chunk, reduce)], tp2[1][(name, chunk, reduce)]
    for r in (r0, r1):
        assert rel(r["loss"], ref) < 1e-6
        assert rel(r["g2"], ref_g2) < 1e-5
    du = r0["du"] if reduce else r0["du"] + r1["du"]
    if reduce:
        assert torch.equal(r0["du"], r1["du"])
    assert rel(du, uu.grad) < 1e-5
    assert rel(torch.cat([r0["dw"], r1["dw"]]), ww.grad) < 1e-5
    if vocab < rows:  # padded rows get no gradient
        assert float(torch.cat([r0["dw"], r1["dw"]])[vocab:].abs().max()) == 0.0


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_tp2_bfloat16_gradients_no_worse_than_unfused(tp2_bf16, name):
    """TP=2, bf16, Zipfian labels, peaked logits: the summed dL/du and the concatenated dL/dW shards are
    at least as accurate against float64 as the unfused bf16 path (one process, full weight)."""
    rows, vocab, ignore, kw = BF16_CASES[name]
    u, w, y = peaked_zipf_problem(1024, 64, rows, vocab, ignore_every=ignore)
    n = int((y != -100).sum())
    grads = {}
    for which, dt in (("ref", torch.float64), ("unfused", torch.bfloat16)):
        uu, ww = u.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        (unfused_loss(uu, ww, y, vocab_size=vocab, **kw).double().sum() / n).backward()
        grads[which] = (uu.grad, ww.grad)
    r0, r1 = tp2_bf16[0][name], tp2_bf16[1][name]
    assert r0["du"].dtype == torch.bfloat16 and r0["dw"].dtype == torch.bfloat16
    fused = gradient_errors((r0["du"].double() + r1["du"].double(), torch.cat([r0["dw"], r1["dw"]])),
                            grads["ref"], y)
    unfused = gradient_errors(grads["unfused"], grads["ref"], y)
    for key in ("dw_top", "dw", "du"):
        assert fused[key] <= 1.1 * unfused[key] + 1e-6, (key, fused, unfused)
    assert bool((torch.cat([r0["dw"], r1["dw"]])[vocab:] == 0).all())  # padded rows: no gradient


def _unfused_tp_errors(dtype, problem, tp):
    """Errors against float64 of the unfused 16-bit path at TP = ``tp`` on one process: per-shard 16-bit logit
    GEMMs, float32 CE over all of them; backward: per-shard 16-bit dL/du partials summed in the 16-bit dtype
    (Megatron's all-reduce of a ColumnParallelLinear's input gradient). Also returns the labels and the ref."""
    u, w, y = problem(1024, 64, 2048, dtype=dtype)
    n = int((y != -100).sum())
    grads = {}
    for which, dt in (("ref", torch.float64), ("unfused", dtype)):
        uu, ww = u.to(dt).clone().requires_grad_(), w.to(dt).clone().requires_grad_()
        logits = torch.cat([uu @ part.t() for part in ww.chunk(tp)], dim=1)
        loss = torch.nn.functional.cross_entropy(logits.double() if dt == torch.float64 else logits.float(), y,
                                                 reduction="none")
        (loss.double().sum() / n).backward()
        grads[which] = (uu.grad, ww.grad)
    return gradient_errors(grads["unfused"], grads["ref"], y), grads["ref"], y


@pytest.mark.parametrize("logits", sorted(PROBLEMS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_tp2_16bit_gradients_no_worse_than_unfused_at_any_chunk_count(tp2_chunked, dtype, logits):
    """TP=2, bf16 and fp16, flat (logits ~ N(0, 1)) and peaked logits, Zipfian labels, 1/2/7/64 chunks per
    shard: dL/du and the concatenated dL/dW shards against float64 within 2% of the unfused path's error:
    the op's own all-reduce (float32, reduce_grad_input=True) against unfused TP=1; the default partials,
    summed in the 16-bit dtype as Megatron's all-reduce does, against the unfused path's partials at TP=2."""
    dt = DTYPES[dtype]
    unfused1, ref, y = _unfused_tp_errors(dt, PROBLEMS[logits], 1)
    unfused2, _, _ = _unfused_tp_errors(dt, PROBLEMS[logits], 2)
    for chunks in CHUNKS_PER_SHARD:
        for reduce, unfused in ((True, unfused1), (False, unfused2)):
            r0, r1 = (tp2_chunked[i][(dtype, logits, chunks, reduce)] for i in (0, 1))
            du = r0["du"] if reduce else r0["du"] + r1["du"]  # 16-bit sum of 16-bit partials
            if reduce:
                assert torch.equal(r0["du"], r1["du"])
            fused = gradient_errors((du, torch.cat([r0["dw"], r1["dw"]])), ref, y)
            for key in ("du", "dw", "dw_top"):
                assert fused[key] <= 1.02 * unfused[key], (chunks, reduce, key, fused, unfused)


def test_tp2_matches_megatron_vocab_parallel_cross_entropy():
    """TP=2, no padding, no smoothing: loss, partial dL/du and dL/dweight equal Megatron's."""
    res = mb.launch(run_megatron_comparison, 2, 0.0)
    for r in res:
        for got, want in zip(r["fused"], r["megatron"]):
            assert rel(got, want) < 1e-5


def test_tp1_matches_megatron_label_smoothing():
    """TP=1: Megatron's label smoothing (K = local vocab = V here) equals the op's."""
    (r,) = mb.launch(run_megatron_comparison, 1, 0.1)
    for got, want in zip(r["fused"], r["megatron"]):
        assert rel(got, want) < 1e-5


def run_megatron_ddp(into_main_grad, dtype):
    """A weight under Megatron-Core's DDP (float32 main_grad buffers), two micro-batches of the op with
    weight_grad_into_main_grad on or off; returns main_grad after finish_grad_sync and the flags."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    mb.initialize_parallel(1)
    u, w, y = peaked_zipf_problem(64, 16, 96, 90, ignore_every=5)  # bf16 values
    u, w = u.to(dtype), w.to(dtype)
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(w.clone())
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, use_cpu_initialization=True)
    ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=head)
    p = ddp.module.weight
    ddp.zero_grad_buffer()
    for _ in range(2):
        loss = linear_cross_entropy(u, p, y, vocab_size=90, label_smoothing=0.1, chunk_size=32,
                                    weight_grad_into_main_grad=into_main_grad)
        loss.sum().backward()
    ddp.finish_grad_sync()
    return dict(main_grad=p.main_grad.clone(), grad=p.grad, flag=p.grad_added_to_main_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_into_main_grad_under_megatron_ddp(dtype):
    """Megatron DDP: with weight_grad_into_main_grad the op adds the float32 dL/dW into main_grad itself
    (grad_added_to_main_grad set, so DDP's hook skips the dummy grad); main_grad equals DDP's own
    accumulation of the returned gradient (exactly in float32; bf16: closer to the float32 gradient)."""
    (plain,) = mb.launch(run_megatron_ddp, 1, False, dtype)
    (fused,) = mb.launch(run_megatron_ddp, 1, True, dtype)
    assert fused["flag"] is True and plain["flag"] is False
    assert fused["grad"] is None and plain["grad"] is None  # DDP's hook released both
    if dtype == torch.float32:
        assert rel(fused["main_grad"], plain["main_grad"]) < 1e-6
    else:
        (exact,) = mb.launch(run_megatron_ddp, 1, True, torch.float32)  # float32 math on the same bf16 values
        err_fused = rel(fused["main_grad"], exact["main_grad"])
        assert err_fused < 1e-2 and err_fused <= rel(plain["main_grad"], exact["main_grad"])
