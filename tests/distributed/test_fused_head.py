"""The fused head + loss inside GPTModel (``enable_fused_loss``): the same losses and gradients as the unfused
head + Megatron's cross-entropy at TP=1, TP=2 and TP=2 + SP, with a loss mask, for low-rank and dense heads;
padded vocabulary excluded; the probe's figures from the fused statistics equal the unfused probe's."""
import functools

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.heads import disable_fused_loss, enable_fused_loss
from tests import support

LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 2, False), "tp2_sp": (2, 2, True)}  # world, tp, sp


def masked_batches(seed=0):
    batches = support.batches(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for b in batches:
        b["loss_mask"] = (torch.rand(b["tokens"].shape, generator=gen) > 0.3).float()
    return batches


def step(tp, sp, rank, ckpt, fused: bool, probe: bool = False):
    cfg, chunks = support.build_chunks(tp, 1, None, sp, rank)
    support.load(chunks, ckpt)
    if fused:
        enable_fused_loss(chunks)
    outputs = []  # the head's output rank: 2 = the fused per-token loss [s, b], 3 = logits [s, b, V/tp]
    mb.find_head(chunks).register_forward_hook(lambda _m, _a, out: outputs.append(out[0].dim()))
    p = None
    if probe:
        p = mb.GradientProbe(mb.ProbeConfig(interval=1, vocab_size=support.VOCAB))
        p.watch(chunks, num_microbatches=support.NUM_MICRO)
    models = support.wrap_ddp(cfg, chunks)
    result = mb.forward_backward(models, masked_batches())
    if p is not None:
        p.end_step()
    grads = {name: prm.main_grad.detach().clone() for name, prm in support.canonical_params(models[0])}
    return {"losses": result.losses, "grads": grads, "history": p.history if p else None,
            "fused_ran": set(outputs) == {2}}


def fused_and_unfused(tp, sp, rank, ckpt, probe=False):
    return {"fused": step(tp, sp, rank, ckpt, True, probe), "unfused": step(tp, sp, rank, ckpt, False, probe)}


@pytest.mark.parametrize("layout,rank", [("tp1", 16), ("tp2", 16), ("tp2_sp", 16), ("tp2_sp", None)],
                         ids=["low_rank_tp1", "low_rank_tp2", "low_rank_tp2_sp", "dense_tp2_sp"])
def test_fused_equals_unfused(reference, layout, rank):
    world, tp, sp = LAYOUTS[layout]
    fn = functools.partial(fused_and_unfused, tp, sp, rank, reference["ckpt"] if rank else _dense_ckpt(reference))
    for r in mb.launch(fn, world, timeout=300):
        f, u = r["fused"], r["unfused"]
        assert f["fused_ran"] and not u["fused_ran"]
        torch.testing.assert_close(torch.tensor(f["losses"]), torch.tensor(u["losses"]), rtol=1e-6, atol=0)
        assert set(f["grads"]) == set(u["grads"])
        for key in u["grads"]:
            torch.testing.assert_close(f["grads"][key], u["grads"][key], rtol=1e-5, atol=1e-7, msg=key)


def _dense_ckpt(reference):
    return reference["dense_ckpt"]


def test_probe_figures_from_fused_statistics_equal_the_unfused_probe(reference):
    for r in mb.launch(functools.partial(fused_and_unfused, 2, True, 16, reference["ckpt"], True), 2, timeout=300):
        if r["fused"]["history"] is None:
            continue
        (f,), (u,) = r["fused"]["history"], r["unfused"]["history"]
        for key in ("grad_norm", "hidden_grad_norm", "destroyed_ratio", "visible_cosine", "isotropic_baseline"):
            assert f[key] == pytest.approx(u[key], rel=1e-5), key


def padded_vocab_run(ckpt):
    """Real vocabulary 251 of the head's 256 rows: the fused loss leaves the 5 padded classes out of the
    softmax; the reference builds the logits, drops those columns and takes torch's cross-entropy."""
    cfg, chunks = support.build_chunks(1, 1, None, False, 16)
    support.load(chunks, ckpt)
    model = chunks[0]
    head = mb.find_head(model)
    head.vocab_size = support.VOCAB - 5  # the head contract's real vocabulary
    batch = masked_batches()[0]
    batch["labels"] = batch["labels"] % (support.VOCAB - 5)  # real classes only
    pos = torch.arange(support.SEQ).unsqueeze(0).expand(support.MICRO, -1)
    captured = {}
    handle = head.register_forward_pre_hook(lambda _m, args: captured.setdefault("h", args[0]))
    enable_fused_loss(model)
    fused = model(batch["tokens"], pos, None, labels=batch["labels"])
    (fused * batch["loss_mask"]).sum().backward()
    grad_a = head.weight.grad.clone()
    disable_fused_loss(model)
    handle.remove()
    head.weight.grad = None
    logits, _ = head(captured["h"].detach())
    ref = torch.nn.functional.cross_entropy(logits[..., : support.VOCAB - 5].float().reshape(-1, support.VOCAB - 5),
                                            batch["labels"].t().reshape(-1), reduction="none").reshape(
        support.SEQ, support.MICRO).t()
    (ref * batch["loss_mask"]).sum().backward()
    return fused.detach(), ref.detach(), grad_a, head.weight.grad.clone()


def test_padded_vocabulary_is_excluded(reference):
    fused, ref, grad_fused, grad_ref = mb.launch(padded_vocab_run, 1, reference["ckpt"], timeout=300)[0]
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad_fused[-5:].abs().max() == 0  # padded rows get no gradient


def fp8_training(tmp, data):
    """The same short run with the fused head in fp32 and with its GEMMs in FP8 (e4m3 / e5m2 gradients)."""
    from megatron_bottleneck.train import Trainer, TrainConfig

    losses = {}
    for fp8 in (None, "e4m3"):
        cfg = TrainConfig.from_dict({
            "model": {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 2, "seq_length": 16,
                      "head_rank": 16, "fused_loss": True, "head_fp8": fp8},
            "train": {"train_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "eval_interval": 0},
            "optim": {"lr": 1e-2, "warmup_steps": 2},
            "data": {"train_prefix": data["train_prefix"], "sample": "packed"},
            "logging": {"dir": f"{tmp}/{fp8}", "console": False, "tensorboard": False}})
        losses[fp8] = [h["loss"] for h in Trainer(cfg).train()["history"]]
    return losses


def test_fp8_head_tracks_fp32_on_a_short_run(tmp_path, spamlang):
    losses = mb.launch(fp8_training, 1, str(tmp_path), spamlang, timeout=600)[0]
    fp32, fp8 = losses[None], losses["e4m3"]
    assert fp32[-1] < fp32[0] - 0.3  # it learns
    # Stated tolerance: every step's loss within 3% of the fp32 run's (e4m3 logits, e5m2 gradients).
    assert fp8 == pytest.approx(fp32, rel=0.03)
    assert fp8 != fp32  # the FP8 GEMMs did run
