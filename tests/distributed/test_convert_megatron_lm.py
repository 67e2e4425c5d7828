"""``megatron-bottleneck convert-head`` on a Megatron-LM ``torch_dist`` checkpoint (issue 26): a dense, untied head
trained by the unchanged ``pretrain_gpt.py`` at TP=2 (the tiny model of test_megatron_lm: D=64, V=1000 padded to
1024; 8 iterations, saved at 6), converted at r = D through the command line and at r = 4 through ``mb.convert_head``
(two CPU ranks each, at the saved TP=2: each rank reads, factorises and writes its vocabulary shard), then the r = D
checkpoint resumed through the runner at TP=2 with ``--lm-head-rank 64``:
its first loss (iteration 7, computed before that step's update) is the dense run's own iteration 7. From the raw
saved tensors: A B = W at r = D, A B is the float64 best rank-4 approximation of W at r = 4 (to 1e-5), every other
weight copied exactly. Bad input is one line before any rank starts. 2 Megatron-LM runs (2 ranks), 2 two-rank
conversions; both lanes (megatron-core 0.16 keeps the common state in common.pt, 0.19 inside the .distcp files)."""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

from tests.distributed import test_megatron_lm as mlm
from tests.distributed.test_megatron_lm import _dcp_tensors, _ok, losses, run

pytestmark = mlm.pytestmark

D, STEP, ITERS = 64, 6, 8
DENSE = ["--untie-embeddings-and-output-weights", "--tensor-model-parallel-size", "2", "--ckpt-format", "torch_dist"]


def _cli(argv):
    from megatron_bottleneck.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import megatron_bottleneck as mb

    root = tmp_path_factory.mktemp("convert_mlm")
    out = {"root": root, "dense_ckpt": root / "dense"}
    out["dense"] = run(2, DENSE + ["--save", str(root / "dense"), "--save-interval", str(STEP)], train_iters=ITERS)
    _ok(*out["dense"])
    src = root / "dense" / f"iter_{STEP:07d}"
    out["src"] = src
    out["cli"] = _cli(["convert-head", str(src), "--head", f"low_rank:r={D}", "--out", str(root / "r64"),
                       "--device", "cpu"])
    out["r4"] = mb.convert_head(str(src), "low_rank:r=4", str(root / "r4"), device="cpu")
    if out["cli"][0] == 0:
        out["resumed"] = run(2, DENSE + ["--lm-head-rank", str(D), "--load", str(root / "r64"), "--no-load-optim"],
                             train_iters=ITERS)
    return out


def _weights(iter_dir):
    from torch.distributed.checkpoint import FileSystemReader

    names = [n for n in FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
             if n.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in n]
    return _dcp_tensors(iter_dir, names)


def test_the_command_writes_a_megatron_lm_checkpoint(runs):
    from megatron_bottleneck.measure.megatron_lm_checkpoint import read_megatron_lm_common_state

    code, text, err = runs["cli"]
    assert code == 0, err[-3000:]
    out = runs["root"] / "r64"
    assert f"low_rank r={D} head" in text and f"step {STEP}" in text and "keeps 100.00%" in text
    assert f"--lm-head-rank {D} --load {out} --no-load-optim" in text and "megatron_bottleneck.megatron_lm" in text
    assert "saved at TP = 2, PP = 1" in text
    for r, d in ((D, out), (4, runs["root"] / "r4")):
        assert (d / "latest_checkpointed_iteration.txt").read_text() == str(STEP)
        common = read_megatron_lm_common_state(str(d / f"iter_{STEP:07d}"))
        a = common["args"]
        assert a.lm_head_rank == r and a.no_save_optim and a.no_save_rng
        assert a.tensor_model_parallel_size == 2 and a.pipeline_model_parallel_size == 1  # the saved layout
        assert common["iteration"] == STEP and "optimizer" not in common and a.consumed_train_samples == 4 * STEP
    assert runs["r4"]["path"] == str(runs["root"] / "r4" / f"iter_{STEP:07d}") and runs["r4"]["kind"] == "megatron-lm"
    assert runs["r4"]["tensor_model_parallel_size"] == 2


def test_full_rank_resumes_with_the_dense_runs_loss(runs):
    """The runner loads the conversion (written at the saved TP=2) with the low-rank head; iteration 7's
    loss (before its update) is the dense run's iteration 7: the converted model is the trained one."""
    rc, text = runs["resumed"]
    _ok(rc, text)
    assert f"installed a rank-{D} low-rank LM head" in text
    dense, resumed = losses(runs["dense"][1]), losses(text)
    assert sorted(dense) == list(range(1, ITERS + 1)) and sorted(resumed) == [STEP + 1, STEP + 2], text[-3000:]
    assert resumed[STEP + 1] == pytest.approx(dense[STEP + 1], rel=1e-5), (dense, resumed)
    assert 0 < resumed[STEP + 2] < 2 * resumed[STEP + 1]  # it trains on (Adam afresh)


def test_saved_factors_are_the_svd_of_the_trained_head(runs):
    """From the raw saved tensors: r = D gives A B = W; r = 4 the best rank-4 approximation (float64 SVD) to 1e-5;
    the backbone and embeddings copied exactly; the printed kept share is Eckart-Young's."""
    src = _weights(runs["src"])
    w = src.pop("output_layer.weight")
    assert w.shape == (1024, D)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for r in (D, 4):
        got = _weights(runs["root"] / f"r{r}" / f"iter_{STEP:07d}")
        a, b = got.pop("output_layer.weight"), got.pop("output_layer.input_proj")
        assert a.shape == (1024, r) and b.shape == (r, D)
        assert sorted(got) == sorted(src)
        assert all(torch.equal(got[k], src[k]) for k in src)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        torch.testing.assert_close(a @ b, best, rtol=0, atol=1e-5 if r < D else 1e-6)
        if r < D:
            assert (s[r - 1] - s[r]) / s[0] > 1e-3  # a unique best rank-r approximation
            assert (a @ b - w).norm() == pytest.approx(s[r:].norm().item(), rel=1e-5)
            assert runs["r4"]["kept"] == pytest.approx(float(s[:r].square().sum() / s.square().sum()), rel=1e-6)
    # the head's logits on fixed hidden states: r = D equals the dense head
    h = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = _weights(runs["root"] / f"r{D}" / f"iter_{STEP:07d}")
    torch.testing.assert_close((h @ got["output_layer.input_proj"].t()) @ got["output_layer.weight"].t(), h @ w.t(),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["low_rank", "tied", "vpp", "rank", "out"])
def test_bad_megatron_lm_input_is_one_line(runs, case, tmp_path):
    """Each refused before any rank starts (the saved args edited into a common.pt, megatron-core 0.16's layout)."""
    from megatron_bottleneck.measure.megatron_lm_checkpoint import read_megatron_lm_common_state

    ckpt = runs["src"]
    if case in ("low_rank", "tied", "vpp"):
        common = read_megatron_lm_common_state(str(runs["src"]))
        if case == "low_rank":
            common["args"].lm_head_rank = 16
        elif case == "vpp":
            common["args"].virtual_pipeline_model_parallel_size = 2
        else:
            common["args"].untie_embeddings_and_output_weights = False
        ckpt = tmp_path / "edited" / f"iter_{STEP:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "metadata.json").write_text((runs["src"] / "metadata.json").read_text())
        torch.save(common, ckpt / "common.pt")
    rank = {"rank": D + 1}.get(case, 4)
    out = runs["root"] / "r4" if case == "out" else tmp_path / "o"
    code, _text, err = _cli(["convert-head", str(ckpt), "--head", f"low_rank:r={rank}", "--out", str(out),
                             "--device", "cpu"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert {"low_rank": "saved with --lm-head-rank 16", "tied": "--untie-embeddings-and-output-weights",
            "rank": f"exceeds the hidden size {D}", "out": "already holds a checkpoint",
            "vpp": "--virtual-pipeline-model-parallel-size 2"}[case] in lines[0]
    assert not os.path.exists(tmp_path / "o")
