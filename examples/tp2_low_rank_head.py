"""Build a TP=2 Llama-style GPT with a rank-64 LM head on CPU (2 gloo ranks) and print its loss.

    python examples/tp2_low_rank_head.py
"""
import torch

import megatron_bottleneck as mb


def main():
    mb.initialize_parallel(tensor_model_parallel_size=2, seed=1234)
    config = mb.llama_config(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=256, tensor_model_parallel_size=2, sequence_parallel=True,
        use_cpu_initialization=True,
    )
    vocab = mb.padded_vocab_size(1000, tensor_model_parallel_size=2)  # 1024
    model = mb.build_gpt_model(config, vocab, max_sequence_length=64, head_rank=64)
    tokens = torch.randint(0, 1000, (2, 65), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, -1)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    if torch.distributed.get_rank() == 0:
        print(model.output_layer)
        print(f"loss {loss.item():.4f} (ln V = {torch.log(torch.tensor(float(vocab))):.4f})")
    return loss.item()


if __name__ == "__main__":
    losses = mb.launch(main, 2)
    assert losses[0] == losses[1]
