"""The backbone in FP8 through Transformer Engine (``model.fp8``): GPU and TE only, skipped elsewhere.

Each recipe trains the same tiny SpamLang model as a bf16 run under torchrun (one GPU, NCCL), through the
command line a user runs; the FP8 runs must build Megatron's TE layers and track the bf16 losses.
Record the output of a GPU run in bench/RESULTS.md.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml


def _has_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _has_transformer_engine()),
                                reason="needs a CUDA GPU and NVIDIA Transformer Engine")

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256, "seq_length": 8,
         "vocab_size": 64}


def _train(tmp_path, spamlang, name, recipe):
    cfg = {"model": {**MODEL, "fp8": recipe}, "train": {"train_steps": 60, "global_batch_size": 32,
                                                        "micro_batch_size": 32, "eval_interval": 0,
                                                        "precision": "bf16"},
           "optim": {"lr": 1e-2, "warmup_steps": 5}, "checkpoint": {"dir": None},
           "data": {"train_prefix": spamlang["train_prefix"], "valid_prefix": spamlang["valid_prefix"]},
           "logging": {"dir": str(tmp_path / name), "tensorboard": False, "console": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                           "-m", "megatron_bottleneck.cli", "train", str(path)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, MB_FUSED_KERNEL="torch"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_backbone_tracks_bf16(tmp_path, spamlang, recipe):
    bf16 = _train(tmp_path, spamlang, "bf16", None)
    fp8 = _train(tmp_path, spamlang, recipe, recipe)
    assert len(fp8) == len(bf16) == 60
    assert all(x == x for x in fp8), "non-finite FP8 loss"
    late_bf16, late_fp8 = sum(bf16[-10:]) / 10, sum(fp8[-10:]) / 10
    assert late_fp8 < bf16[0] * 0.8, "the FP8 run did not learn"
    assert abs(late_fp8 - late_bf16) < 0.05 * late_bf16, (late_fp8, late_bf16)


def test_fp8_config_builds_transformer_engine_layers(megatron_one_rank):
    from megatron_bottleneck.models import build_gpt_model, llama_config

    cfg = llama_config(2, 64, 4, ffn_hidden_size=256, fp8="hybrid", fp8_recipe="delayed", bf16=True,
                       params_dtype=torch.bfloat16)
    model = build_gpt_model(cfg, 64, 8, head_rank=16)
    names = {type(m).__name__ for m in model.modules()}
    assert any(n.startswith("TE") for n in names), names
    assert type(model.output_layer).__name__ == "LowRankOutputLayer"
