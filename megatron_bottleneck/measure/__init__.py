"""``megatron-bottleneck measure``: the gradient-bottleneck figures of a trained model (HuggingFace causal LM,
one of our trainer's checkpoints, or a Megatron-LM torch_dist checkpoint) on real text, with no parameter
update. See :mod:`.run` for the math, :mod:`.sources` and :mod:`.megatron_lm_checkpoint` for the models."""
from .documents import load_documents
from .run import MeasureConfig, load_model_list, measure_loaded, measure_model
from .sources import LoadedModel, ModelError, load_model

__all__ = ["MeasureConfig", "measure_model", "measure_loaded", "load_model_list", "load_documents", "load_model",
           "LoadedModel", "ModelError"]
