"""python -m megatron_bottleneck.megatron_lm path/to/pretrain_gpt.py <Megatron-LM args> --lm-head-rank R"""
from ..integrations.megatron_lm import main

if __name__ == "__main__":
    main()
