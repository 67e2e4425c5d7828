"""The gradient probe in a plain Megatron-Core training step: one added line in forward_step.

    python examples/probe_forward_step.py        # 2 CPU ranks (TP=2), writes runs/probe_example/
    tensorboard --logdir runs/probe_example      # probe/destroyed_ratio, probe/visible_cosine, ...
"""
import torch

import megatron_bottleneck as mb

SEQ, MICRO, VOCAB = 32, 4, 2048
probe = mb.GradientProbe(mb.ProbeConfig(interval=1, log_dir="runs/probe_example", vocab_size=VOCAB))


def forward_step(data_iterator, model):
    probe.watch(model, num_microbatches=2)  # <- the one line (Megatron-LM: probe.watch(model))
    tokens = next(data_iterator)
    positions = torch.arange(SEQ).expand(MICRO, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])

    def loss_func(output):
        mean = output.float().mean()
        return mean, {"lm loss": mean.detach().clone()}

    return loss, loss_func


def main():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    mb.initialize_parallel(tensor_model_parallel_size=2)
    config = mb.llama_config(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                             tensor_model_parallel_size=2, use_cpu_initialization=True)
    model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(),
                                    module=mb.build_gpt_model(config, VOCAB, SEQ, head_rank=16))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        batches = [torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen) for _ in range(2)]
        # Megatron's schedule over the micro-batches, then finalize_model_grads (an optimizer would step here).
        mb.forward_backward(model, batches, forward_step=forward_step, seq_length=SEQ, micro_batch_size=MICRO)
        probe.end_step()  # the step's one reduction and host transfer (else the next step's forward does it)
        if probe.is_reporter:
            h = probe.history[-1]
            print(f"step {step}: destroyed ratio {h['destroyed_ratio']:.4f} (isotropic baseline "
                  f"{h['isotropic_baseline']:.4f}), visible cosine {h['visible_cosine']:.4f}")


if __name__ == "__main__":
    mb.launch(main, 2)
