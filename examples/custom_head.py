"""A head of your own in one file: a per-token learned temperature, registered, then trained and probed by the
trainer.

    python examples/custom_head.py          # 2 CPU ranks, TP=2 (vocab-parallel head), ~10 training steps

The head (math, shapes: h [..., D], W [V/tp, D] vocab-sharded, t [1, D] and c replicated over TP)::

    beta(h) = softplus(t h + c)             # [..., 1], one inverse temperature per token (init: beta = 1)
    u = log_softmax(beta(h) * W h)          # [..., V/tp], normalised over the whole vocabulary

Writing it on :class:`megatron_bottleneck.VocabParallelHead` takes two functions of a parameter dict:
``replicated_part`` (token-wise work with replicated parameters, before the TP region) and ``sharded_part``
(this rank's vocab columns of log p, normalised with ``tp_log_softmax``). The base class gives the rest:
vocab-parallel W, TP-invariant init, sequence parallelism, the unfused forward, a (materialised) loss,
distributed checkpoints, and ``log_prob_fn()``, the contract of the general gradient probe for non-linear heads:
the trainer's probe (``probe:`` section) measures this head through it (conjugate gradients with JVP / VJP through
the head on a token sample, ``megatron_bottleneck.probe.general``) and logs the linear heads' figure names
(destroyed_ratio, visible_cosine, grad_norm, update_cosine) plus cg_residual to ``probe.jsonl``.
"""
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import megatron_bottleneck as mb
from megatron_bottleneck.base.tp_autograd import tp_log_softmax


@dataclass
class TemperatureOptions:
    """Options of the ``temperature`` head."""

    init_beta: float = 1.0
    """The inverse temperature every token starts with (c = softplus^-1(init_beta), t = 0)."""


class TemperatureHead(mb.VocabParallelHead):
    """u = log_softmax(softplus(t h + c) W h) (module docstring)."""

    def __init__(self, ctx, options: TemperatureOptions):
        super().__init__(ctx, width=ctx.hidden_size)  # draws W (V x D, TP-invariant) and shards it
        self.add_replicated("temp_proj", torch.zeros(1, ctx.hidden_size))
        self.add_replicated("temp_bias", torch.full((1,), math.log(math.expm1(options.init_beta))))

    def replicated_part(self, p, h):
        beta = F.softplus(h @ p["temp_proj"].t() + p["temp_bias"])  # [..., 1]
        return h, beta

    def sharded_part(self, p, h, beta):
        return tp_log_softmax(beta * (h @ self.weight_rows(p).t()), self.tp_group)


mb.register_head("temperature", TemperatureHead, TemperatureOptions, replace=True,
                 description="per-token learned temperature")


def train(workdir: str):
    from megatron_bottleneck.data import SpamLangConfig, generate_spamlang
    from megatron_bottleneck.train import Trainer, TrainConfig

    prefix = os.path.join(workdir, "data", "spam")
    if torch.distributed.get_rank() == 0:
        generate_spamlang(SpamLangConfig(64, 8, 800, seed=3), prefix)
    torch.distributed.barrier()
    cfg = TrainConfig.from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_attention_heads": 2, "num_layers": 1, "seq_length": 8,
                  "head_type": "temperature", "head_options": {"init_beta": 1.0}},
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_steps": 10, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 0,
                  "log_interval": 5},
        "optim": {"lr": 3e-2, "warmup_steps": 1},
        "data": {"train_prefix": prefix + "_train", "valid_prefix": prefix + "_valid"},
        "logging": {"dir": os.path.join(workdir, "log"), "console": False},
        # the general probe: every step, on the first 64 tokens, 2 D = 32 CG iterations; update cosine every 5th
        "probe": {"interval": 1, "update_interval": 5, "general_tokens": 64, "general_iterations": 32},
    })
    trainer = Trainer(cfg)
    head = mb.find_head(trainer.models)
    out = trainer.train()
    lp = head.log_prob_fn()  # the general probe's view: log p of this rank's vocab shard as a function of h
    h = torch.randn(4, 16)
    mass = torch.logsumexp(lp(h), dim=-1).exp()  # this rank's share of the probability mass per token
    torch.distributed.all_reduce(mass, group=lp.tp_group)
    return {"head": repr(head), "losses": [r["loss"] for r in out["history"]], "mass": mass.tolist(),
            "probe": list(trainer.probe.history)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        results = mb.launch(train, 2, tmp, timeout=300)
    r = results[0]
    print(r["head"].splitlines()[0])
    print("losses", json.dumps([round(x, 4) for x in r["losses"]]))
    print(f"sum of p over the vocabulary (TP=2, all-reduced): {[round(m, 6) for m in r['mass']]}")
    for rec in r["probe"][::5]:
        print(f"probe step {rec['step']}: destroyed_ratio {rec['destroyed_ratio']:.4f} "
              f"update_cosine {rec.get('update_cosine', float('nan')):.4f} cg_residual {rec['cg_residual']:.1e}")
    ok = r["losses"][-1] < r["losses"][0] and all(abs(m - 1) < 1e-5 for m in r["mass"]) \
        and len(r["probe"]) == 10 and all(0 < rec["destroyed_ratio"] < 1 for rec in r["probe"])
    sys.exit(0 if ok else 1)
