"""The low-rank head in one process (Megatron-Core on a one-rank gloo group): full rank equals Megatron's
dense head, gradients against a float64 reference, every validation error, the pre-wrap hook."""
import re

import pytest
import torch

import megatron_bottleneck as mb
from tests import support

pytestmark = pytest.mark.usefixtures("megatron_one_rank")


error_of = support.error_of


def validation_error(case: str) -> str:
    cfg = support.config()

    def build(c=cfg, **kw):
        return mb.build_gpt_model(c, support.VOCAB, support.SEQ, **kw)

    if case == "twice":
        model = build(head_rank=8)
        return error_of(lambda: mb.install_low_rank_head(model, 8))
    if case == "wrapped":
        return error_of(lambda: mb.install_low_rank_head(support.wrap_ddp(cfg, [build()])[0], 8))
    return error_of({
        "rank0": lambda: build(head_rank=0),
        "rank_too_big": lambda: build(head_rank=support.HIDDEN + 1),
        "tied": lambda: build(head_rank=8, share_embeddings_and_output_weights=True),
        "bad_init": lambda: build(head=mb.LowRankHeadConfig(rank=8, init="svd")),
        "fp8_without_te": lambda: build(support.config(fp8="hybrid"), head_rank=8),
    }[case])


def full_rank_and_hook():
    cfg = support.config()
    full = mb.build_gpt_model(cfg, support.VOCAB, support.SEQ, head_rank=support.HIDDEN)
    hooked = mb.low_rank_head_hook(mb.LowRankHeadConfig(rank=4))(
        [mb.build_gpt_model(cfg, support.VOCAB, support.SEQ) for _ in range(2)])
    return type(full.output_layer).__name__, [(type(m.output_layer).__name__, m.output_layer.rank) for m in hooked]


def test_factorised_full_rank_equals_megatron_dense_head():
    d = support.dense_vs_factorised(1)
    assert d["factorised_loss"] == pytest.approx(d["dense_loss"], rel=1e-6)
    assert d["dh_norm"] > 0 and d["dh_max_diff"] <= 1e-6 * d["dh_norm"]


def test_low_rank_grads_match_float64_reference():
    d = support.low_rank_against_float64()
    assert d["loss"] == pytest.approx(d["ref_loss"], rel=1e-6)
    torch.testing.assert_close(d["a_grad"], d["a_ref"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(d["b_grad"], d["b_ref"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("rank0", r"rank must be an integer >= 1"),
        ("rank_too_big", r"exceeds the hidden size 32"),
        ("tied", r"ties its input embedding.*untie-embeddings-and-output-weights"),
        ("bad_init", r"init='svd' is not one of"),
        ("twice", r"already has a LowRankOutputLayer"),
        ("wrapped", r"before DDP wrapping"),
        ("fp8_without_te", r"fp8='hybrid' needs NVIDIA Transformer Engine.*megatron-bottleneck\[te\]"),
    ],
)
def test_validation_error(case, pattern):
    message = validation_error(case)
    assert re.search(pattern, message), message


def test_full_rank_is_allowed_and_the_pre_wrap_hook_installs_every_chunk():
    full, hooked = full_rank_and_hook()
    assert full == "LowRankOutputLayer" and hooked == [("LowRankOutputLayer", 4)] * 2
