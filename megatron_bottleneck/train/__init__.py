"""The lean Megatron-Core trainer: config, loop, checkpoints, probing a saved checkpoint."""
from .checkpoint import check_layout, latest_checkpoint, load_checkpoint, load_model_only, save_checkpoint
from .config import TrainConfig
from .probe_checkpoint import probe_checkpoint
from .trainer import Trainer, build_models, run

__all__ = ["TrainConfig", "Trainer", "run", "build_models", "save_checkpoint", "load_checkpoint",
           "load_model_only", "latest_checkpoint", "check_layout", "probe_checkpoint"]
