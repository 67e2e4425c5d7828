"""Shared pieces of the HybridModel tests (tests/unit/test_hybrid_model.py, tests/distributed/test_hybrid.py):
the small Llama-style config of tests/support.py as a hybrid ``*-*-`` pattern, the GPTModel with the same weights
(GPT layer k = hybrid layers 2k, 2k + 1), every built-in head kind, and losses / gradients / probe records.
"""
from __future__ import annotations

import re
from typing import Dict, List

import pytest
import torch

import megatron_bottleneck as mb
from tests import support
from tests.lanes import MEGATRON_CORE

HAS_HYBRID = not MEGATRON_CORE.startswith("0.16.")
NEEDS_HYBRID = pytest.mark.skipif(not HAS_HYBRID, reason=f"HybridModel needs megatron-core >= 0.19 (this lane: "
                                  f"{MEGATRON_CORE}, whose build_hybrid_model refuses in one line)")
PATTERN = "*-*-"
# every built-in kind, with options fitting D = 32 (test_every_builtin_kind_is_covered checks the list is complete)
KINDS = ["dense", "low_rank:r=8", "mos:k=2", "mos:k=2,fused=false", "sigsoftmax", "softcap:cap=2",
         "monotone:terms=3", "stacked:width=40,activation=tanh", "mfs:k=2,partitions=3", "mixtape:k=2,frequent=8",
         "decoupled:width=40"]


def config(num_layers, tp=1, pp=1, sp=False, **kw):
    return mb.llama_config(num_layers=num_layers, hidden_size=support.HIDDEN, num_attention_heads=4,
                           num_query_groups=2, ffn_hidden_size=48, use_cpu_initialization=True,
                           tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
                           pipeline_dtype=torch.float32, **kw)


def hybrid(kind, tp=1, pp=1, sp=False, pattern=PATTERN, fused=False):
    return mb.build_hybrid_model(config(len(pattern.replace("|", "")), tp, pp, sp), support.VOCAB, support.SEQ,
                                 hybrid_layer_pattern=pattern, head=mb.HeadConfig.parse(kind, seed=7),
                                 fused_loss=fused)


def gpt(kind, fused=False):
    return mb.build_gpt_model(config(len(PATTERN) // 2), support.VOCAB, support.SEQ,
                              head=mb.HeadConfig.parse(kind, seed=7), fused_loss=fused)


def gpt_name(hybrid_name: str) -> str:
    """The GPTModel parameter holding a hybrid ``*-*-`` parameter: decoder.layers.i.X -> decoder.layers.(i//2).X."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", hybrid_name)
    if m:
        return f"decoder.layers.{int(m.group(1)) // 2}.{m.group(2)}"
    return hybrid_name.replace("decoder.final_norm.", "decoder.final_layernorm.")


def copy_weights(src_gpt, dst_hybrid) -> None:
    """Every hybrid parameter from its GPT twin (each GPT parameter used exactly once)."""
    src = dict(src_gpt.named_parameters())
    names = [gpt_name(n) for n, _ in dst_hybrid.named_parameters()]
    assert sorted(names) == sorted(src), (sorted(set(names) ^ set(src)))
    with torch.no_grad():
        for (_, p), name in zip(dst_hybrid.named_parameters(), names):
            p.copy_(src[name])


def loss_and_grads(model, batch, probe: bool = False) -> Dict:
    """Mean per-token loss, every parameter's gradient (by GPT name) and, with ``probe``, the GradientProbe
    record of one forward-backward."""
    p = None
    if probe:
        p = mb.GradientProbe(mb.ProbeConfig(interval=1, update_interval=1, vocab_size=support.VOCAB,
                                            general_tokens=16, general_iterations=16))
        p.watch(model, num_microbatches=1)
    model.zero_grad(set_to_none=True)
    pos = torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
    loss = model(batch["tokens"], pos, None, labels=batch["labels"]).float().mean()
    loss.backward()
    record = p.end_step() if p is not None else None
    if p is not None:
        p.remove()
    name = gpt_name if hasattr(model, "hybrid_layer_pattern") else (lambda n: n)
    grads = {name(n): prm.grad.detach().clone() for n, prm in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "record": record}


def head_grads(result: Dict) -> List[str]:
    return [n for n in result["grads"] if n.startswith("output_layer.")]
