"""One typed training config: dataclass sections, loaded from YAML plus ``section.key=value`` overrides.

Every error names the offending key (``ConfigError: unknown key 'optim.lrr' (did you mean 'optim.lr'?)``).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence

import torch
import yaml

from ..base.errors import ConfigError, DataError, HeadConfigError
from ..heads import HeadConfig
from ..heads.install import refuse_from_dense_before_load, require_transformer_engine
from ..data import spamlang_sequence_tokens, validate_gpt_data
from ..models.hybrid import LOCAL_SYMBOLS, default_hybrid_pattern, require_hybrid_model
from ..probe import ProbeConfig


@dataclass
class ModelSection:
    """The Llama-style GPT (RMSNorm, SwiGLU, RoPE, grouped-query attention, untied embeddings)."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 32
    """D, the hidden width."""
    num_attention_heads: int = 4
    """Attention heads (must divide hidden_size and be divisible by the TP size)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None: one per attention head."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner width; None: 4 x hidden_size."""
    seq_length: int = 16
    """Tokens per training sequence."""
    vocab_size: int = 128
    """V, the model's vocabulary (a multiple of the TP size; data token ids must be below it)."""
    head_rank: Optional[int] = None
    """r of the low-rank head W = A B (1 <= r <= hidden_size); None: Megatron's dense head."""
    head_init: Literal["balanced", "orthogonal", "from_dense"] = "balanced"
    """Initialisation of A and B (see LowRankOutputLayer); from_dense is refused (the model is built before a
    checkpoint loads: ``megatron-bottleneck convert-head`` factorises a trained dense head)."""
    head_type: Optional[str] = None
    """The head kind, any registered one (``megatron_bottleneck.register_head``): dense, low_rank, mos,
    sigsoftmax, softcap, monotone, stacked, ...; None: low_rank when head_rank is set, else dense."""
    head_options: Dict[str, Any] = field(default_factory=dict)
    """The head kind's options, e.g. ``{k: 4}`` for mos (README "Head designs"); low_rank takes r from
    head_rank and init from head_init when not given here."""
    fused_loss: bool = False
    """Head and cross-entropy fused: no T x V logits (dense or low-rank head; see heads/model_loss.py)."""
    head_fp8: Optional[Literal["e4m3"]] = None
    """With fused_loss: the head's GEMMs in FP8 (e4m3 forward, e5m2 gradients, torch._scaled_mm); tokens per
    micro-batch and the head's input width must be multiples of 16."""
    fp8: Optional[Literal["delayed", "tensorwise", "mxfp8", "blockwise"]] = None
    """The backbone's linear layers in FP8 through Transformer Engine with this scaling recipe (Megatron's TE
    layer spec and FP8 autocast, fp8='hybrid': e4m3 forward, e5m2 gradients); None: off. Needs TE, a CUDA
    GPU and bf16 (train.precision bf16 or auto); mxfp8 needs a Blackwell GPU. The head stays in bf16 (Megatron's
    FP8 autocast wraps only the decoder); ``head_fp8`` puts it in FP8 too."""
    init_method_std: float = 0.02
    """Std of the weight init (and of each entry of A B for the low-rank head)."""
    arch: Literal["gpt", "hybrid"] = "gpt"
    """Megatron-Core's model class: ``gpt`` (GPTModel) or ``hybrid`` (HybridModel, megatron-core >= 0.19, with
    the local hybrid stack spec: the same math and parameters as ``gpt`` under other names)."""
    hybrid_layer_pattern: Optional[str] = None
    """With arch hybrid: the layer pattern (``*`` attention, ``-`` MLP, ``|`` between pipeline stages, one segment
    per pipeline stage and virtual stage); None: ``*-`` per layer of ``num_layers``, split evenly into the pipeline
    (and virtual pipeline) stages. When given, it alone sets the layers (``num_layers`` is not read)."""


@dataclass
class ParallelSection:
    """Megatron parallelism; data parallelism is what is left: world size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """TP: ranks sharing each layer (vocab-parallel head included)."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved schedule); None: off."""
    sequence_parallel: bool = False
    """Shard activations over the sequence inside TP regions (TP > 1 only)."""
    distributed_optimizer: bool = True
    """Megatron's DistributedOptimizer: Adam state and fp32 main weights sharded over data-parallel ranks."""
    overlap_grad_reduce: Optional[bool] = None
    """Data-parallel gradient reduce-scatter (all-reduce with the replicated optimizer) in buckets, each launched
    as soon as its gradients are complete, overlapped with the rest of backward (Megatron DDP
    ``overlap_grad_reduce``). None: on (NCCL and gloo alike)."""
    overlap_param_gather: Optional[bool] = None
    """The distributed optimizer's parameter all-gather overlapped with the next forward, bucket by bucket (Megatron
    ``overlap_param_gather``); needs ``distributed_optimizer`` and ``overlap_grad_reduce``. None: on when both are."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per data-parallel communication bucket; None: Megatron-LM's default, max(40M, 1M x data-parallel
    size) with overlap (small models then have a single bucket), one bucket per buffer without."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Weight gradients accumulated straight into the fp32 ``main_grad`` inside the weight-gradient GEMM (Megatron
    ``gradient_accumulation_fusion``: Apex's / TE's ``fused_weight_gradient_mlp_cuda`` kernel). None: on when that
    kernel imports and a GPU is visible, else off (always off on CPUs)."""


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to ``min_lr``."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping (0: off)."""
    warmup_steps: int = 10
    """Linear warmup steps from 0 to ``lr``."""


@dataclass
class TrainSection:
    """Batches, length of the run, evaluation and logging cadence."""

    global_batch_size: int = 32
    """Sequences per optimizer step (a multiple of micro_batch_size x data-parallel size)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    train_steps: int = 100
    """Optimizer steps."""
    eval_interval: int = 20
    """Validation every N steps (and at the last step); 0: never."""
    eval_iters: int = 2
    """Global batches per validation."""
    log_interval: int = 10
    """Console line every N steps (metrics.jsonl gets every step)."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPUs, fp32 on CPUs."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where the ranks run (:func:`~megatron_bottleneck.base.device.resolve_device`), under torchrun and under the
    local launcher (``--nproc``) alike. auto: one CUDA GPU per rank (``cuda:LOCAL_RANK``, NCCL, bf16 by
    ``precision=auto``) when visible; with none visible, CPU ranks (gloo, CPU mode, fp32) under the local
    launcher, but under torchrun / Slurm a one-line error unless ``MB_CPU=1`` (a GPU job that forgot
    ``--gpus-per-node`` must not train on CPU). cuda: GPUs or a one-line error (also when a node runs more ranks
    than it has GPUs). cpu: CPU ranks with gloo on purpose, GPUs visible or not (CPU mode hides them)."""
    cpu_initialization: Optional[bool] = None
    """Build every weight full-size on the host, then shard it (Megatron's ``use_cpu_initialization``: every
    TP size draws the same weights, at the cost of host memory and time); None: on CPU ranks only (on GPUs
    each rank draws its own shard on its device, as Megatron-LM does by default)."""


@dataclass
class DataSection:
    """Megatron indexed datasets (``<prefix>.bin`` / ``.idx``) through megatron-core's GPTDataset."""

    train_prefix: str = ""
    """Training data: a prefix or a Megatron-LM blend ``"0.7 path/a 0.3 path/b"`` (required unless mock)."""
    valid_prefix: Optional[str] = None
    """Validation data (prefix or blend); None: the ``split`` of train_prefix gives it."""
    split: str = "969,30,1"
    """train,valid,test shares of train_prefix's documents when valid_prefix is None."""
    sample: Literal["auto", "packed", "document"] = "auto"
    """packed: documents concatenated and cut into seq_length + 1 windows (Megatron-LM's way); document: each
    sample is one document of exactly seq_length + 1 tokens (SpamLang); auto: document for SpamLang data."""
    mock: bool = False
    """Megatron's MockGPTDataset (random documents, no files)."""


@dataclass
class CheckpointSection:
    """Atomic distributed checkpoints with exact resume."""

    dir: Optional[str] = None
    """Checkpoint directory; None: no checkpoints."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are removed)."""
    resume: bool = True
    """Resume from ``dir``'s latest checkpoint when there is one (at another DP size too, and another TP/PP size
    from a checkpoint saved with ``optimizer_format=fully_reshardable``; another model is refused)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is saved. The rule: dp_reshardable unless the run's checkpoints are to
    be resumed at another TP or PP size, then fully_reshardable.

    - dp_reshardable (default, as Megatron-LM): each DP rank writes its own shard of the optimizer state, nothing
      gathered (measured: a save takes about a third of the rank's own shard beyond the model's, a load nothing);
      resumes at any DP size and the same TP/PP sizes. A resume at other TP/PP sizes is refused in one line, as in
      Megatron-LM.
    - fully_reshardable: the state per parameter (model space); resumes at any TP/PP/DP size. Saved with
      megatron-core's memory-efficient variant: the shards are gathered onto DP rank 0 (which writes them), so
      that rank holds the whole optimizer state of its model-parallel part during a save (3 fp32 values per
      parameter; measured 2.3-2.5x that at the peak, the other ranks a copy of their shard); at resume every rank
      reads all of it (1.7x). bench/save_memory.py measures both formats (bench/RESULTS.md).

    To change TP/PP of a run saved with dp_reshardable: resume it at its saved sizes with fully_reshardable, then
    resume that checkpoint at the new sizes. A resume reads the format a checkpoint was saved with
    (``layout.json``); this field sets the format of the run's own saves."""
    async_save: Optional[bool] = None
    """Write the model and optimizer shards in a background process while training goes on (Megatron's async
    distributed-checkpoint save); the checkpoint becomes ``latest`` only once every rank's write has finished,
    and a pending save is finished before the trainer returns. None: on (NCCL and gloo alike)."""
    scheduler: Literal["error", "config", "checkpoint"] = "error"
    """What a resume does when the saved learning-rate schedule (optim.lr, min_lr, warmup_steps,
    weight_decay, train.train_steps) differs from this config's: error (one CheckpointError line naming the
    fields), config (this config's schedule continued from the saved step, e.g. to extend a run's
    train_steps; Megatron-LM's --override-opt_param-scheduler) or checkpoint (the saved schedule; Megatron-LM's
    --use-checkpoint-opt_param-scheduler)."""


@dataclass
class LoggingSection:
    """Where metrics go (``metrics.jsonl`` always)."""

    dir: str = "runs/train"
    """Run directory: metrics.jsonl, probe.jsonl, config.yaml, tensorboard/."""
    tensorboard: bool = True
    """Also write TensorBoard events (skipped with one warning when tensorboard is not installed)."""
    wandb_project: Optional[str] = None
    """Also log to this W&B project."""
    console: bool = True
    """Print a progress line every ``train.log_interval`` steps."""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    probe: Dict[str, Any] = field(default_factory=dict)
    """GradientProbe settings (ProbeConfig fields, e.g. ``{interval: 10, rank_interval: 500}``); {}: no probe."""

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        cfg = cls()
        for section, values in (data or {}).items():
            _set(cfg, section, values, section)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Sequence[str] = ()) -> "TrainConfig":
        return cls.from_dict(cls.apply_overrides(cls.read_yaml(path), overrides))

    @staticmethod
    def read_yaml(path: Optional[str]) -> Dict[str, Any]:
        """A config file's mapping of sections ({} for no path); an unreadable file or no mapping: one line."""
        data: Dict[str, Any] = {}
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path!r} must hold a mapping of sections, got {type(data).__name__}")
        return data

    @staticmethod
    def apply_overrides(data: Dict[str, Any], overrides: Sequence[str] = ()) -> Dict[str, Any]:
        """``section.key=value`` overrides (values read as YAML) set into ``data`` (changed in place, returned)."""
        for item in overrides:
            key, sep, value = item.lstrip("-").partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            section, _, name = key.partition(".")
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"'{section}' is not a section")
            _nested_set(data[section], name, yaml.safe_load(value))
        return data

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ----------------------------------------------------------- validation
    def _validate_fp8(self) -> None:
        """model.fp8: shapes TE's FP8 GEMMs accept, bf16, then the environment (TE and a GPU)."""
        m, t = self.model, self.train
        if t.precision == "fp32":
            raise ConfigError(f"model.fp8={m.fp8} runs on bf16 weights: set train.precision=bf16 (or auto)")
        align = 32 if m.fp8 == "mxfp8" else 16
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        for name, value in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size", ffn),
                            ("tokens per micro-batch (train.micro_batch_size x model.seq_length)",
                             t.micro_batch_size * m.seq_length)):
            if value % align:
                raise ConfigError(f"model.fp8={m.fp8}: {name} is {value}, not a multiple of {align} as its FP8 "
                                  f"GEMMs need")
        require_transformer_engine(f"model.fp8={m.fp8}", error=ConfigError)
        if not torch.cuda.is_available():
            raise ConfigError(f"model.fp8={m.fp8} needs a CUDA GPU (Transformer Engine's FP8 GEMMs); "
                              "none is visible here")

    def head_config(self):
        """The model's head as a :class:`~megatron_bottleneck.base.head.HeadConfig` (kind, options, seed),
        checked: an unknown kind or option, or a head_rank with another kind, is one ConfigError line."""
        m = self.model
        kind = m.head_type or ("low_rank" if m.head_rank is not None else "dense")
        if not isinstance(m.head_options, dict):
            raise ConfigError(f"model.head_options must be a mapping (e.g. {{k: 4}}), got {m.head_options!r}")
        options = dict(m.head_options)
        if kind == "low_rank":
            if m.head_rank is not None:
                options.setdefault("r", m.head_rank)
            options.setdefault("init", m.head_init)
        elif m.head_rank is not None:
            raise ConfigError(f"model.head_rank={m.head_rank} is the low-rank head's rank, but model.head_type="
                              f"{kind}: drop head_rank, or set head_type=low_rank")
        head = HeadConfig(kind, options, seed=self.train.seed)
        try:
            opts = head.resolved_options()
        except HeadConfigError as exc:
            raise ConfigError(f"model.head_type / model.head_options: {exc}") from None
        if kind == "low_rank" and not 1 <= opts.r <= m.hidden_size:
            raise ConfigError(f"model.head_options.r must be in [1, model.hidden_size={m.hidden_size}], got {opts.r}")
        if kind == "stacked" and opts.width is not None and opts.width < m.hidden_size:
            raise ConfigError(f"model.head_options.width must be >= model.hidden_size={m.hidden_size} (D' >= D), "
                              f"got {opts.width}")
        return head

    def hybrid_pattern(self) -> Optional[str]:
        """The HybridModel layer pattern of ``model.arch: hybrid`` (None for gpt): ``model.hybrid_layer_pattern``,
        or ``*-`` per layer split into PP x VPP stages with ``|``."""
        m, p = self.model, self.parallel
        if m.arch != "hybrid":
            return None
        if m.hybrid_layer_pattern is not None:
            return m.hybrid_layer_pattern
        stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
        try:
            return default_hybrid_pattern(2 * m.num_layers, stages)
        except ConfigError:
            raise ConfigError(f"model.num_layers={m.num_layers} does not split evenly into {stages} pipeline stages "
                              "(parallel.pipeline_model_parallel_size x virtual_pipeline_model_parallel_size): give "
                              "model.hybrid_layer_pattern with '|' between stages") from None

    def _validate_arch(self) -> None:
        m, p = self.model, self.parallel
        if m.arch not in ("gpt", "hybrid"):
            raise ConfigError(f"model.arch must be gpt or hybrid, got {m.arch!r}")
        if m.arch == "gpt":
            if m.hybrid_layer_pattern is not None:
                raise ConfigError("model.hybrid_layer_pattern is for model.arch=hybrid: set arch=hybrid, or drop the "
                                  "pattern")
            return
        try:
            require_hybrid_model()
        except ConfigError as exc:
            raise ConfigError(f"model.arch=hybrid: {exc}") from None
        if m.fp8:
            raise ConfigError("model.fp8 runs through Transformer Engine's GPT layer spec: with model.arch=hybrid "
                              "set fp8=null, or use arch=gpt")
        pattern = self.hybrid_pattern()
        other = sorted(set(pattern) - set(LOCAL_SYMBOLS) - {"|"})
        if not pattern.replace("|", "") or other:
            extra = f", not {''.join(other)!r}" if other else ""
            raise ConfigError(f"model.hybrid_layer_pattern={pattern!r}: the trainer builds attention '*' and MLP '-' "
                              f"layers (with '|' between pipeline stages){extra}")
        stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
        if stages > 1 and pattern.count("|") + 1 != stages:
            raise ConfigError(f"model.hybrid_layer_pattern={pattern!r} has {pattern.count('|') + 1} stage segments "
                              f"('|'), and this run has {stages} pipeline stages (parallel.pipeline_model_parallel_size"
                              " x virtual_pipeline_model_parallel_size): one segment per stage")

    def validate(self) -> None:
        m, p, t = self.model, self.parallel, self.train
        positive = {"model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size,
                    "model.num_attention_heads": m.num_attention_heads, "model.seq_length": m.seq_length,
                    "model.vocab_size": m.vocab_size, "train.global_batch_size": t.global_batch_size,
                    "train.micro_batch_size": t.micro_batch_size, "train.train_steps": t.train_steps,
                    "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
                    "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if m.head_rank is not None and not 1 <= m.head_rank <= m.hidden_size:
            raise ConfigError(f"model.head_rank must be in [1, model.hidden_size={m.hidden_size}] or null "
                              f"(dense head), got {m.head_rank}")
        self._validate_arch()
        head = self.head_config()
        refuse_from_dense_before_load(head, "model.head_init=from_dense (the trainer builds the model before it "
                                            "resumes)", error=ConfigError)
        if head.kind not in ("dense", "low_rank") and m.head_fp8:
            raise ConfigError(f"model.head_fp8 is for the dense and low-rank heads, not model.head_type={head.kind}: "
                              "set head_fp8=null")
        if m.head_fp8 and not m.fused_loss:
            raise ConfigError("model.head_fp8 needs model.fused_loss=true (FP8 runs inside the fused head + loss)")
        if m.head_fp8:
            width = m.head_rank or m.hidden_size
            tokens = t.micro_batch_size * m.seq_length
            for name, value in (("the head's input width (model.head_rank or model.hidden_size)", width),
                                ("tokens per micro-batch (train.micro_batch_size x model.seq_length)", tokens)):
                if value % 16:
                    raise ConfigError(f"model.head_fp8: {name} is {value}, not a multiple of 16 as FP8 GEMMs need")
        if m.fp8:
            self._validate_fp8()
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                              f"model.num_attention_heads={m.num_attention_heads}")
        if m.num_attention_heads % p.tensor_model_parallel_size:
            raise ConfigError(f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} must divide "
                              f"model.num_attention_heads={m.num_attention_heads}")
        if m.vocab_size % p.tensor_model_parallel_size:
            raise ConfigError(f"model.vocab_size={m.vocab_size} must be divisible by "
                              f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} (pad it)")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                              f"train.micro_batch_size={t.micro_batch_size}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        self._validate_overlap()
        if self.probe:
            bad = set(self.probe) - {f.name for f in dataclasses.fields(ProbeConfig)}
            if bad:
                name = sorted(bad)[0]
                known = [f.name for f in dataclasses.fields(ProbeConfig)]
                raise ConfigError(f"unknown key 'probe.{name}'{_suggest(name, known, 'probe.')}")


    def _validate_overlap(self) -> None:
        """parallel.overlap_* / ddp_bucket_size / gradient_accumulation_fusion: what needs no process."""
        p = self.parallel
        if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
            raise ConfigError(f"parallel.ddp_bucket_size must be >= 1 (parameters per bucket) or null, got "
                              f"{p.ddp_bucket_size}")
        if p.overlap_param_gather and not p.distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true (the "
                              "replicated optimizer gathers no parameters): set it, or overlap_param_gather=null")
        if p.overlap_param_gather and p.overlap_grad_reduce is False:
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce (Megatron "
                              "overlaps the all-gather only then): set overlap_grad_reduce=true, or "
                              "overlap_param_gather=false")
        if p.gradient_accumulation_fusion and not fused_wgrad_available():
            raise ConfigError("parallel.gradient_accumulation_fusion=true needs a CUDA GPU and the "
                              "fused_weight_gradient_mlp_cuda kernel (Apex built with --cuda_ext): install it, or "
                              "set parallel.gradient_accumulation_fusion=null (on where available)")

    def runtime_options(self, backend: str, data_parallel_size: int) -> "RuntimeOptions":
        """The overlap / fusion / async-save settings of a run whose process group has ``backend`` ("nccl",
        "gloo": what ``torch.distributed.get_backend()`` says) and ``data_parallel_size`` ranks per replica
        group, None fields resolved. Megatron-Core runs every overlap and the async save on gloo as on NCCL
        (measured: bit-identical losses), so auto means on for both; gradient-accumulation fusion depends on the
        machine (a GPU and its kernel), not on the backend."""
        p, c = self.parallel, self.checkpoint
        grad = True if p.overlap_grad_reduce is None else p.overlap_grad_reduce
        gather = (p.distributed_optimizer and grad) if p.overlap_param_gather is None else p.overlap_param_gather
        # Megatron-LM's default; without overlap one bucket per buffer (nothing to overlap with) unless set. The
        # buckets also place the distributed optimizer's shard boundaries, hence the sum order of the grad norm.
        bucket = p.ddp_bucket_size
        if bucket is None and grad:
            bucket = max(40_000_000, 1_000_000 * data_parallel_size)
        fusion = p.gradient_accumulation_fusion
        return RuntimeOptions(
            backend=backend, overlap_grad_reduce=grad, overlap_param_gather=gather, bucket_size=bucket,
            gradient_accumulation_fusion=fused_wgrad_available() if fusion is None else fusion,
            async_save=bool(c.dir) and (True if c.async_save is None else c.async_save))

    def check_world(self, world_size: int) -> None:
        """Checks that need no process: the layout against ``world_size`` ranks, batch sizes against the
        data-parallel size, and the data (files present, token ids within the vocabulary)."""
        p, t = self.parallel, self.train
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % mp:
            raise ConfigError(f"{world_size} ranks cannot hold parallel.tensor_model_parallel_size="
                              f"{p.tensor_model_parallel_size} x parallel.pipeline_model_parallel_size="
                              f"{p.pipeline_model_parallel_size}: use a multiple of {mp} ranks (--nproc).")
        dp = world_size // mp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                              f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp} with "
                              f"{world_size} ranks): change the batch sizes or the number of ranks.")
        d = self.data
        if not d.train_prefix and not d.mock:
            raise ConfigError("data.train_prefix is empty: point it at an indexed dataset prefix "
                              "(data.train_prefix=path/to/prefix, without .bin/.idx) or a blend, or set data.mock=true")
        validate_gpt_data(d.train_prefix or None, d.valid_prefix, None, vocab_size=self.model.vocab_size,
                          split=d.split, num_samples=self.num_samples(), mock=d.mock)
        if self.document_samples():
            for prefix in filter(None, (d.train_prefix, d.valid_prefix)):
                length = spamlang_sequence_tokens(prefix)
                if length is not None and length != self.model.seq_length + 1:
                    raise DataError(f"data: the SpamLang sequences of {prefix!r} have {length} tokens but "
                                    f"model.seq_length={self.model.seq_length} reads seq_length + 1 = "
                                    f"{self.model.seq_length + 1}: set model.seq_length={length - 1}.")

    def num_samples(self):
        """Samples each split is read for: (train steps x global batch, eval iters x global batch, 0)."""
        t = self.train
        return (t.train_steps * t.global_batch_size, t.eval_iters * t.global_batch_size if t.eval_interval else 0, 0)

    def document_samples(self) -> bool:
        """Whether a sample is one whole document (``data.sample``; auto: every dataset is SpamLang)."""
        d = self.data
        if d.sample != "auto":
            return d.sample == "document"
        prefixes = [p for p in (d.train_prefix, d.valid_prefix) if p]
        return bool(prefixes) and not d.mock and all(spamlang_sequence_tokens(p) is not None for p in prefixes)


@dataclass(frozen=True)
class RuntimeOptions:
    """What a run uses, from :meth:`TrainConfig.runtime_options` (no None left)."""

    backend: str
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    bucket_size: Optional[int]
    """Parameters per DDP bucket; None: one bucket per buffer (no overlap)."""
    gradient_accumulation_fusion: bool
    async_save: bool


def fused_wgrad_available() -> bool:
    """Whether Megatron's ``gradient_accumulation_fusion`` can run here: a CUDA GPU and the
    ``fused_weight_gradient_mlp_cuda`` extension (what Megatron's linear layers import for it)."""
    if not torch.cuda.is_available():
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def _suggest(name: str, options: List[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys: {', '.join(options)}"


def _nested_set(d: Dict, dotted: str, value: Any) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        _nested_set(d.setdefault(head, {}), rest, value)
    else:
        d[head] = value


def _set(cfg: TrainConfig, section: str, values: Any, where: str) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if section not in names:
        raise ConfigError(f"unknown section '{section}'{_suggest(section, names)}")
    if section == "probe":
        if not isinstance(values, dict):
            raise ConfigError("'probe' must be a mapping of GradientProbe settings")
        cfg.probe = dict(values)
        return
    target = getattr(cfg, section)
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{section}.{key}'{_suggest(key, list(fields), section + '.')}")
        setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
    if typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is Literal:  # Optional[Literal[...]]
            return _coerce(value, hint, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")
