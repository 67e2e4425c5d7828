"""Shared pieces of the distributed tests, run on real CPU ranks (``megatron_bottleneck.launch``).

A small Llama-style GPTModel per parallel layout, deterministic batches, distributed checkpoints shared
by layouts (so every layout starts from the same weights), one real step through the project's schedule
driver (Megatron's pipeline schedule, Megatron DDP, ``finalize_model_grads``), and gradients keyed by a
layout-independent name with the tensor-parallel metadata needed to reassemble full tensors in the parent.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch

import megatron_bottleneck as mb

VOCAB, SEQ, MICRO, NUM_MICRO, HIDDEN = 256, 16, 2, 4, 32


def error_of(fn) -> str:
    """``fn()``'s megatron-bottleneck input error as "Type: message" ("no error" when it raises none)."""
    try:
        fn()
    except mb.BottleneckError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def config(tp=1, pp=1, vpp=None, sp=False, **kw):
    return mb.llama_config(
        num_layers=4,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sp,
        pipeline_dtype=torch.float32,
        **kw,
    )


def batches(seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_MICRO):
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def build_chunks(tp, pp, vpp, sp, rank, **kw):
    mb.initialize_parallel(tp, pp, vpp, seed=1234)
    cfg = config(tp, pp, vpp, sp, **kw)
    head = None if rank is None else mb.LowRankHeadConfig(rank=rank, seed=7)
    return cfg, [
        mb.build_gpt_model(cfg, VOCAB, SEQ, head=head, vp_stage=(i if vpp else None))
        for i in range(vpp or 1)
    ]


def canonical_params(chunk):
    """(name, param) with layer indices made global so names agree across pipeline layouts."""
    module = getattr(chunk, "module", chunk)
    for name, p in module.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            layer = module.decoder.layers[int(m.group(1))]
            name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
        yield name, p


def merged_sharded_state_dict(chunks):
    """One sub-dict per model chunk; the ShardedTensor keys inside are layout-independent."""
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save(chunks, path):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(merged_sharded_state_dict(chunks), path)


def load(chunks, path):
    from megatron.core import dist_checkpointing

    sd = dist_checkpointing.load(merged_sharded_state_dict(chunks), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(sd[f"chunk{i}"], strict=False)


def wrap_ddp(cfg, chunks):
    """Megatron DDP around each chunk (replicated optimizer layout, no overlap)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    return [DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)]


def train_step(cfg, chunks, data) -> Dict:
    """One forward-backward with Megatron DDP; returns losses and canonical gradients."""
    from megatron.core import parallel_state as ps

    models = wrap_ddp(cfg, chunks)
    result = mb.forward_backward(models, data)
    grads = {}
    for m in models:
        for name, p in canonical_params(m):
            grads[name] = {
                "grad": p.main_grad.detach().clone(),
                "tp": bool(getattr(p, "tensor_model_parallel", False)),
                "dim": getattr(p, "partition_dim", -1),
                "stride": getattr(p, "partition_stride", 1),
            }
    return {
        "losses": result.losses,
        "grads": grads,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def assemble(results) -> Dict[str, torch.Tensor]:
    """Full gradients from every rank's shards (tensor-parallel shards joined, stride-aware)."""
    shards: Dict[str, Dict[int, Dict]] = {}
    for r in results:
        if r["dp_rank"] != 0:
            continue
        for name, g in r["grads"].items():
            shards.setdefault(name, {})[r["tp_rank"]] = g
    full = {}
    for name, by_rank in shards.items():
        first = by_rank[0]
        if not first["tp"] or len(by_rank) == 1:
            full[name] = first["grad"]
            continue
        stride, dim, tp = first["stride"], first["dim"], len(by_rank)
        chunks = [by_rank[t]["grad"].chunk(stride, dim=dim) for t in range(tp)]
        full[name] = torch.cat([chunks[t][s] for s in range(stride) for t in range(tp)], dim=dim)
    return full


def last_stage_losses(results) -> List[float]:
    return next(r["losses"] for r in results if r["losses"] is not None)


def step_layout(tp, pp, vpp, sp, rank, ckpt, **kw) -> Dict:
    cfg, chunks = build_chunks(tp, pp, vpp, sp, rank, **kw)
    load(chunks, ckpt)
    return train_step(cfg, chunks, batches())


def loss_of(chunks, data) -> float:
    """Mean loss of the full batch on a single-stage model (no backward)."""
    with torch.no_grad():
        losses = []
        for b in data:
            pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO, -1)
            losses.append(chunks[0](b["tokens"], pos, None, labels=b["labels"]).float().mean())
        return torch.stack(losses).mean().item()


def save_reference(rank: int, ckpt: str) -> Optional[Dict]:
    """TP=1 reference: build, save its checkpoint, run the step."""
    cfg, chunks = build_chunks(1, 1, None, False, rank)
    save(chunks, ckpt)
    return train_step(cfg, chunks, batches())


def head_input_and_loss(model, batch):
    """Loss and dL/dH at the head input for one batch (single process, no DDP)."""
    captured = {}

    def pre_hook(_module, args):
        args[0].retain_grad()
        captured["h"] = args[0]

    handle = mb.find_head(model).register_forward_pre_hook(pre_hook)
    pos = torch.arange(SEQ).unsqueeze(0).expand(MICRO, -1)
    loss = model(batch["tokens"], pos, None, labels=batch["labels"]).float().mean()
    loss.backward()
    handle.remove()
    return loss.item(), captured["h"].grad.detach().clone(), captured["h"].detach().clone()


def float64_head_grads(h, labels, a, b):
    """dL/dA, dL/dB of mean cross-entropy for logits = H B^T A^T, in float64 (pure torch)."""
    a64 = a.detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    logits = h.double() @ b64.t() @ a64.t()  # [s, b, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.t().reshape(-1))
    loss.backward()
    return loss.item(), a64.grad, b64.grad


def dense_vs_factorised(tp: int):
    """Megatron's dense head vs the factorised head with A = W, B = I (rank = D)."""
    _, (dense,) = build_chunks(tp, 1, None, False, None)
    _, (factorised,) = build_chunks(tp, 1, None, False, None)
    factorised.load_state_dict(dense.state_dict())
    mb.install_low_rank_head(factorised, mb.LowRankHeadConfig(rank=HIDDEN, init="from_dense"))
    batch = batches()[0]
    ld, gd, _ = head_input_and_loss(dense, batch)
    lf, gf, _ = head_input_and_loss(factorised, batch)
    return {"dense_loss": ld, "factorised_loss": lf, "dh_max_diff": (gd - gf).abs().max().item(),
            "dh_norm": gd.norm().item()}


def low_rank_against_float64():
    _, (lowrank,) = build_chunks(1, 1, None, False, 16)
    batch = batches()[0]
    loss, _, h = head_input_and_loss(lowrank, batch)
    head = lowrank.output_layer
    ref_loss, ga, gb = float64_head_grads(h, batch["labels"], head.weight, head.input_proj)
    return {"loss": loss, "ref_loss": ref_loss, "a_grad": head.weight.grad.double(), "a_ref": ga,
            "b_grad": head.input_proj.grad.double(), "b_ref": gb}
