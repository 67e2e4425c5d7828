"""python -m megatron_bottleneck.megatron_lm path/to/pretrain_gpt.py <Megatron-LM args> --lm-head-rank R"""

if __name__ == "__main__":
    from ..integrations.bridge import mark_old_nvrx_absent

    mark_old_nvrx_absent()  # before megatron-core's first import (nvidia-resiliency-ext 0.4.1 breaks it)
    from ..integrations.megatron_lm import main

    main()
