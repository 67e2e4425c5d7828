"""Warnings Megatron-Core prints that say nothing new after the first time (torch only, so it can run
before megatron-core is imported)."""
import logging
import warnings

__all__ = ["quiet_megatron_warnings"]


def quiet_megatron_warnings(missing_extensions: str = "once") -> None:
    """Show Megatron-Core's import-time warnings about missing Apex / Transformer Engine ``"once"`` per
    process (or ``"ignore"`` them), and silence the ones it repeats every step on CPU
    (CUDA_DEVICE_MAX_CONNECTIONS, torch deprecations inside Megatron); nothing else is filtered."""
    warnings.filterwarnings(missing_extensions, message=".*(Apex|Transformer Engine|transformer_engine|apex).*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on import
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message="Could not determine (rank|world size)")
    # the trainer gives GPTDataset eod == pad on purpose: no real token is then masked as padding
    warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")  # 0.19, before any process group
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch)\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*(ShardedTensor|deprecated).*")
