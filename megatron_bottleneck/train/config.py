"""One typed training config: dataclass sections, loaded from YAML plus ``section.key=value`` overrides.

Every error names the offending key (``ConfigError: unknown key 'optim.lrr' (did you mean 'optim.lr'?)``).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import ConfigError


@dataclass
class ModelSection:
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 16
    vocab_size: int = 128
    head_rank: Optional[int] = None  # None: Megatron's dense head
    head_init: str = "balanced"
    init_method_std: float = 0.02


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True  # Megatron's DistributedOptimizer: Adam state sharded over data-parallel ranks


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10


@dataclass
class TrainSection:
    global_batch_size: int = 32
    micro_batch_size: int = 8
    train_steps: int = 100
    eval_interval: int = 20
    eval_iters: int = 2
    log_interval: int = 10
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class DataSection:
    train_prefix: str = ""
    valid_prefix: Optional[str] = None


@dataclass
class CheckpointSection:
    dir: Optional[str] = None
    save_interval: int = 0
    keep_last: int = 2
    resume: bool = True


@dataclass
class LoggingSection:
    dir: str = "runs/train"
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    console: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    probe: Dict[str, Any] = field(default_factory=dict)  # ProbeConfig keyword arguments; {} = no probe

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
        data: Dict[str, Any] = {}
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f) or {}
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path!r} must hold a mapping of sections, got {type(data).__name__}")
        for item in overrides:
            key, sep, value = item.lstrip("-").partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            section, _, name = key.partition(".")
            data.setdefault(section, {})
            if not isinstance(data[section], dict):
                raise ConfigError(f"'{section}' is not a section")
            _nested_set(data[section], name, yaml.safe_load(value))
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ----------------------------------------------------------- validation
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
        if t.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.probe:
            from ..probe import ProbeConfig

            bad = set(self.probe) - {f.name for f in dataclasses.fields(ProbeConfig)}
            if bad:
                name = sorted(bad)[0]
                known = [f.name for f in dataclasses.fields(ProbeConfig)]
                raise ConfigError(f"unknown key 'probe.{name}'{_suggest(name, known, 'probe.')}")


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
    if typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
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
