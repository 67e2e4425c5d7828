"""megatron-bottleneck: measure and remove the LM-head gradient bottleneck in Megatron-Core.

torch is deliberately *not* pinned to a CUDA build: GPU clusters keep the torch they have. On a
CPU-only machine install the CPU wheel first (see README), then this package.
"""
import re

from setuptools import find_packages, setup

# The version is written once, in megatron_bottleneck/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', open("megatron_bottleneck/__init__.py", encoding="utf-8").read(),
                    re.M).group(1)

setup(
    name="megatron-bottleneck",
    version=VERSION,
    description="Low-rank LM heads and an exact gradient-bottleneck probe for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_bottleneck", "megatron_bottleneck.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Supported range: torch 2.6+ (tested 2.13.0 CPU and 2.14.1), megatron-core 0.16 to 0.19.
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml",
        "packaging",
        "psutil",  # megatron.core.dist_checkpointing needs it to save
    ],
    extras_require={
        "test": ["pytest>=7", "tensorboard", "sentencepiece", "tokenizers", "matplotlib", "lightning",
                 "transformers>=4.45", "safetensors"],  # transformers: measure's tests and README example
        "te": ["transformer-engine[pytorch]>=2.0"],
        "plot": ["matplotlib"],
        "data": ["sentencepiece", "tokenizers"],
        "log": ["tensorboard"],
        # `megatron-bottleneck measure` on HuggingFace models (tested with transformers 4.57.6, 5.12.1 and 5.24.0)
        # gguf + accelerate: transformers' GGUF reader (measure MODEL.gguf); matplotlib: measure's plots
        "hf": ["transformers>=4.45", "safetensors", "gguf", "accelerate", "matplotlib"],
        # megatron-bottleneck eval: zero-shot scores through EleutherAI's lm-evaluation-harness (its LM API, 0.4.x)
        "eval": ["lm-eval>=0.4,<0.5"],
        # What Megatron-LM's own training code (megatron/training, pretrain_gpt.py) imports besides megatron-core.
        "megatron-lm": ["six", "regex", "pydantic", "triton", "pybind11"],
    },
    entry_points={"console_scripts": ["megatron-bottleneck=megatron_bottleneck.cli:main"]},
)
