"""The training config and the command line's parsing: key-naming errors, Literal choices, checks that need
no process, options and overrides in any order, one-line errors."""
import pytest

from megatron_bottleneck.base.errors import ConfigError, DataError
from megatron_bottleneck.cli import main, parse_args
from megatron_bottleneck.train import TrainConfig


def test_config_typo_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        TrainConfig.from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        TrainConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be int, got 'eight'"):
        TrainConfig.from_dict({"train": {"micro_batch_size": "eight"}})
    with pytest.raises(ConfigError, match=r"unknown key 'probe.intervall' \(did you mean 'probe.interval'\?\)"):
        TrainConfig.from_dict({"probe": {"intervall": 3}})


def test_literal_fields_name_their_choices():
    with pytest.raises(ConfigError, match=r"train.precision must be one of auto, fp32, bf16; got 'fp16'"):
        TrainConfig.from_dict({"train": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"model.head_init must be one of balanced, orthogonal, from_dense"):
        TrainConfig.from_dict({"model": {"head_init": "svd"}})
    assert TrainConfig.from_dict({"model": {"head_init": "orthogonal"}}).model.head_init == "orthogonal"


def test_checks_against_the_world_size_need_no_process(spamlang):
    cfg = TrainConfig.from_dict({"train": {"global_batch_size": 24, "micro_batch_size": 8},
                                 "model": {"vocab_size": 64, "seq_length": 8},
                                 "data": {"train_prefix": spamlang["train_prefix"]}})
    cfg.check_world(1)
    with pytest.raises(ConfigError, match=r"must be a multiple of train.micro_batch_size x data-parallel size"):
        cfg.check_world(2)
    cfg.parallel.tensor_model_parallel_size = 2
    with pytest.raises(ConfigError, match=r"3 ranks cannot hold .* use a multiple of 2 ranks"):
        cfg.check_world(3)
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.model.seq_length = 16
    with pytest.raises(DataError, match=r"have 9 tokens but model.seq_length=16 .* set model.seq_length=8"):
        cfg.check_world(1)
    cfg.model.seq_length, cfg.model.vocab_size = 8, 16
    with pytest.raises(DataError, match=r"has token id 63 but the model's vocabulary has 16 ids; set model.vocab_size >= 64"):
        cfg.check_world(1)
    cfg.model.vocab_size, cfg.data.train_prefix = 64, "/nonexistent/corpus"
    with pytest.raises(DataError, match=r"no indexed dataset at '/nonexistent/corpus'"):
        cfg.check_world(1)


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 0.1}\n")
    assert main(["train", str(bad)]) == 2
    assert capsys.readouterr().err == "error: unknown key 'optim.lrr' (did you mean 'optim.lr'?)\n"
    assert main(["probe", str(tmp_path), "--data", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint at")


def test_options_and_overrides_in_any_order():
    a = parse_args(["train", "cfg.yaml", "--nproc", "2", "optim.lr=0.1", "train.seed=3"])
    b = parse_args(["train", "--nproc", "2", "cfg.yaml", "optim.lr=0.1", "train.seed=3"])
    c = parse_args(["--debug", "train", "cfg.yaml", "optim.lr=0.1", "--nproc", "2", "train.seed=3"])
    for args in (a, b, c):
        assert (args.config, args.nproc, args.overrides) == ("cfg.yaml", 2, ["optim.lr=0.1", "train.seed=3"])
    assert c.debug and not a.debug


def test_head_fp8_needs_the_fused_loss_and_multiples_of_16():
    with pytest.raises(ConfigError, match=r"model.head_fp8 needs model.fused_loss=true"):
        TrainConfig.from_dict({"model": {"head_fp8": "e4m3"}})
    with pytest.raises(ConfigError, match=r"head's input width .* is 8, not a multiple of 16"):
        TrainConfig.from_dict({"model": {"head_fp8": "e4m3", "fused_loss": True, "head_rank": 8, "hidden_size": 32}})
    with pytest.raises(ConfigError, match=r"tokens per micro-batch .* is 24, not a multiple of 16"):
        TrainConfig.from_dict({"model": {"head_fp8": "e4m3", "fused_loss": True, "seq_length": 3, "hidden_size": 32},
                               "train": {"micro_batch_size": 8, "global_batch_size": 8}})


def _has_transformer_engine():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def test_backbone_fp8_is_checked_before_anything_runs(capsys):
    """model.fp8 (Transformer Engine recipes): the recipe name, bf16, FP8-friendly shapes, then TE and a GPU,
    each refused in one line; the command line says it before spawning any rank."""
    fp8_model = {"hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match=r"model.fp8 must be one of delayed, tensorwise, mxfp8, blockwise; got 'e4m3'"):
        TrainConfig.from_dict({"model": {**fp8_model, "fp8": "e4m3"}})
    with pytest.raises(ConfigError, match=r"model.fp8=delayed runs on bf16 weights: set train.precision=bf16"):
        TrainConfig.from_dict({"model": {**fp8_model, "fp8": "delayed"}, "train": {"precision": "fp32"}})
    with pytest.raises(ConfigError, match=r"model.fp8=tensorwise: model.hidden_size is 40, not a multiple of 16"):
        TrainConfig.from_dict({"model": {"hidden_size": 40, "num_attention_heads": 4, "fp8": "tensorwise"}})
    with pytest.raises(ConfigError, match=r"model.fp8=mxfp8: model.hidden_size is 48, not a multiple of 32"):
        TrainConfig.from_dict({"model": {"hidden_size": 48, "num_attention_heads": 4, "fp8": "mxfp8"}})
    if _has_transformer_engine():
        pytest.skip("Transformer Engine is installed: its absence cannot be tested here")
    with pytest.raises(ConfigError, match=r"model.fp8=delayed needs NVIDIA Transformer Engine, which is not installed"):
        TrainConfig.from_dict({"model": {**fp8_model, "fp8": "delayed"}})
    assert main(["bench-train", "examples/cpu_demo.yaml", "model.hidden_size=64", "--fp8", "none,delayed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.fp8=delayed needs NVIDIA Transformer Engine"), err


def test_overlap_and_async_save_defaults_and_refusals():
    """parallel.overlap_* / ddp_bucket_size / gradient_accumulation_fusion and checkpoint.async_save: null resolves
    per backend at run time (on for NCCL and gloo: Megatron-Core runs both overlaps and the async save on gloo);
    what cannot work is refused in one line naming the field."""
    cfg = TrainConfig.from_dict({"checkpoint": {"dir": "ckpt"}})  # the default dp_reshardable optimizer format
    assert cfg.checkpoint.optimizer_format == "dp_reshardable"
    for backend in ("nccl", "gloo"):
        run = cfg.runtime_options(backend, 2)
        assert (run.backend, run.overlap_grad_reduce, run.overlap_param_gather, run.async_save) == (backend, True,
                                                                                                    True, True)
        assert run.bucket_size == 40_000_000  # Megatron-LM's default, max(40M, 1M x DP)
    # the fully_reshardable format too (its save is given the buffer's own offsets: checkpoint.py)
    run = TrainConfig.from_dict({"checkpoint": {"dir": "ckpt", "optimizer_format": "fully_reshardable"}}
                                ).runtime_options("nccl", 2)
    assert (run.overlap_grad_reduce, run.overlap_param_gather, run.async_save) == (True, True, True)
    assert TrainConfig.from_dict({"parallel": {"overlap_grad_reduce": True}}).runtime_options("nccl", 2).overlap_grad_reduce
    off = TrainConfig.from_dict({"parallel": {"overlap_grad_reduce": False, "distributed_optimizer": False}})
    run = off.runtime_options("gloo", 2)
    assert (run.overlap_grad_reduce, run.overlap_param_gather, run.bucket_size, run.async_save) == (False, False,
                                                                                                   None, False)
    assert TrainConfig.from_dict({"parallel": {"overlap_grad_reduce": False, "ddp_bucket_size": 9}}).runtime_options(
        "gloo", 2).bucket_size == 9
    replicated = TrainConfig.from_dict({"parallel": {"distributed_optimizer": False, "ddp_bucket_size": 1000}})
    run = replicated.runtime_options("gloo", 2)
    assert (run.overlap_grad_reduce, run.overlap_param_gather, run.bucket_size) == (True, False, 1000)
    refused = {
        "parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true": {
            "parallel": {"overlap_param_gather": True, "distributed_optimizer": False}},
        "parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce": {
            "parallel": {"overlap_param_gather": True, "overlap_grad_reduce": False}},
        "parallel.ddp_bucket_size must be >= 1": {"parallel": {"ddp_bucket_size": 0}},
        "checkpoint.async_save must be bool": {"checkpoint": {"async_save": "yes"}},
    }
    import torch
    if not torch.cuda.is_available():
        refused["parallel.gradient_accumulation_fusion=true needs a CUDA GPU and the fused_weight_gradient_mlp_cuda"
                ] = {"parallel": {"gradient_accumulation_fusion": True}}
        assert not TrainConfig().runtime_options("gloo", 1).gradient_accumulation_fusion
    for start, d in refused.items():
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(d)
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_the_optimizer_format_rule():
    """checkpoint.optimizer_format: dp_reshardable by default (Megatron-LM's: no gather at save), fully_reshardable
    when asked for (then megatron-core's memory-efficient save: gathered on DP rank 0 only); anything else is one
    line naming the field and the choices."""
    from megatron_bottleneck.train.checkpoint import DEFAULT_OPTIMIZER_FORMAT, _optimizer_metadata

    assert TrainConfig().checkpoint.optimizer_format == DEFAULT_OPTIMIZER_FORMAT == "dp_reshardable"
    assert _optimizer_metadata(None) == _optimizer_metadata("dp_reshardable") == {
        "distrib_optim_sharding_type": "dp_reshardable"}
    full = TrainConfig.from_dict({"checkpoint": {"optimizer_format": "fully_reshardable"}}).checkpoint.optimizer_format
    assert _optimizer_metadata(full) == {"distrib_optim_sharding_type": "fully_reshardable",
                                         "distrib_optim_fully_reshardable_mem_efficient": True}
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"checkpoint": {"optimizer_format": "fully_sharded_model_space"}})
    assert "\n" not in str(e.value) and "checkpoint.optimizer_format" in str(e.value)
    assert "dp_reshardable" in str(e.value) and "fully_reshardable" in str(e.value)
