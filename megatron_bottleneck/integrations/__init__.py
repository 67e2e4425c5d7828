"""Integrations with training frameworks built on Megatron-Core (Megatron-LM, Megatron-Bridge).

Each submodule imports its framework lazily; importing this package needs only megatron-core.
"""
