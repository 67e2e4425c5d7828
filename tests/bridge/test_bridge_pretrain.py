"""Megatron-Bridge's real ``pretrain()`` on CPU/gloo with the plugin (CI lane "bridge", .ci/run).

The low-rank head and the fused loss through Bridge's pre-wrap hooks, the probe as a Bridge callback, CPU mode
from the one ``enable_cpu_mode()`` call (made by ``mb.launch`` in every rank). No stand-in for Bridge: skipped
when Megatron-Bridge is not installed.
"""
import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None
                                or importlib.util.find_spec("megatron.bridge") is None,
                                reason="Megatron-Bridge is not installed (the CI lane 'bridge' installs it)")

from megatron_bottleneck.integrations.bridge import mark_old_nvrx_absent  # noqa: E402 (imports no megatron-core)

mark_old_nvrx_absent()  # this lane's nvidia-resiliency-ext 0.4.1: before this process first imports megatron-core

VOCAB = 500  # padded to 512 for the model (TP=1 and TP=2 alike); the probe uses 500
RANK = 16
ITERS = 2


def _config(tp: int, tied: bool, log_dir: str):
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (CheckpointConfig, ConfigContainer, DistributedInitConfig,
                                                 LoggerConfig, MockGPTDatasetConfig, OptimizerConfig, RNGConfig,
                                                 SchedulerConfig, TrainingConfig, ValidationConfig)
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    import torch

    model = GPTModelProvider(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, seq_length=32,
        vocab_size=VOCAB, should_pad_vocab=True, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, share_embeddings_and_output_weights=tied,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=False, fp16=False, params_dtype=torch.float32, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False)
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=ITERS, micro_batch_size=2, global_batch_size=2),
        validation=ValidationConfig(eval_iters=0, eval_interval=1000),
        optimizer=OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=0.0, weight_decay=0.0, bf16=False, fp16=False, use_distributed_optimizer=False,
                                  clip_grad=1.0),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0, lr_warmup_init=0.0, lr_decay_iters=ITERS,
                              start_weight_decay=0.0, end_weight_decay=0.0, weight_decay_incr_style="constant"),
        dataset=MockGPTDatasetConfig(seq_length=32, random_seed=1234, reset_attention_mask=False,
                                     reset_position_ids=False, eod_mask_loss=False, num_dataset_builder_threads=1,
                                     dataloader_type="single", num_workers=0),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(save=None, load=None),
        dist=DistributedInitConfig(distributed_backend="gloo"),
        rng=RNGConfig(seed=1234),
    )


def readme_bridge_example() -> str:
    """docs/bridge.md's Bridge code block (the one after ``<!-- bridge-example -->``)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "bridge.md").read_text(encoding="utf-8")
    block = text.split("<!-- bridge-example -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def _pretrain(tp: int, tied: bool, log_dir: str):
    """One rank of Bridge's pretrain() through the docs' example: (per-step losses, probe history)."""
    from megatron.bridge.training.callbacks import Callback

    losses = []

    class Losses(Callback):
        def on_train_step_end(self, context):
            losses.append({k: float(v) for k, v in (context.loss_dict or {}).items()})

    example: dict = {}
    exec(compile(readme_bridge_example(), "docs/bridge.md:bridge-example", "exec"), example)
    history = example["bridge_pretrain"](_config(tp, tied, log_dir), [Losses()])
    return losses, history


def test_bridge_pretrain_tp1_equals_tp2_with_low_rank_fused_head_and_probe(tmp_path):
    import megatron_bottleneck as mb

    (l1, h1), = mb.launch(_pretrain, 1, 1, False, str(tmp_path / "tp1"), timeout=300)
    tp2 = mb.launch(_pretrain, 2, 2, False, str(tmp_path / "tp2"), timeout=300)
    l2, h2 = tp2[0]
    assert len(l1) == ITERS and len(l2) == ITERS
    key = next(iter(l1[0]))
    assert [s[key] for s in l2] == pytest.approx([s[key] for s in l1], rel=1e-4)  # same weights, same data
    assert tp2[1][0] == l2
    assert len(h1) == ITERS and len(h2) == ITERS
    for r1, r2 in zip(h1, h2):
        assert r1["head_rank"] == r2["head_rank"] == RANK
        assert r1["isotropic_baseline"] == pytest.approx(math.sqrt(1 - RANK / (VOCAB - 1)))  # not 512
        assert r2["destroyed_ratio"] == pytest.approx(r1["destroyed_ratio"], rel=1e-3, abs=1e-6)


def test_bridge_pretrain_tied_model_refused_in_one_line(tmp_path):
    import megatron_bottleneck as mb

    with pytest.raises(mb.HeadConfigError, match="ties its input embedding") as info:
        mb.launch(_pretrain, 1, 1, True, str(tmp_path), timeout=300)
    assert len(str(info.value).splitlines()) == 1
