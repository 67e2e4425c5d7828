"""``megatron-bottleneck convert-head`` (issue 26): a dense head trained at TP=2 (6 steps, the trainer's tiny model,
V=64, D=16) factorised at r = 4 through the command line and at r = D by the command's rank function (2 CPU ranks
each). At r = D the converted
model's per-token losses are the dense model's; at r = 4 the head A B is the best rank-4 approximation of the trained
W (a float64 SVD) to 1e-5; every other weight is copied unchanged; the r = 4 checkpoint resumes (at the saved TP=2)
with the low-rank head from the saved step, every other parameter's optimizer state (fp32 main weights, Adam moments,
step) the dense checkpoint's as the trainer loads it, the head's Adam moments zero, said in one console line; the same without the distributed optimizer in bf16 (a 2-step
run in the same launch). Bad input is one line, exit 2,
before any rank starts (a Megatron-LM directory without its iteration too). 3 launches of 2 CPU ranks."""
import os
import shutil

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.cli import main
from megatron_bottleneck.train.checkpoint import read_layout
from tests.distributed import convert_ranks as cr

STEPS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spamlang):
    tmp = str(tmp_path_factory.mktemp("convert"))
    dense = os.path.join(tmp, "dense")
    trained = mb.launch(cr.train_dense, 2, os.path.join(tmp, "logs"), spamlang, dense, STEPS, timeout=600)[0]
    out = {"tmp": tmp, "dense": dense, "trained": trained, 16: os.path.join(tmp, "r16"), 4: os.path.join(tmp, "r4")}
    out["cli"] = _cli_capture(["convert-head", dense, "--head", "low_rank:r=4", "--out", out[4], "--device", "cpu"])
    resumed = os.path.join(tmp, "resumed")
    shutil.copytree(out[4], os.path.join(resumed, "ckpt"))  # the resumed run saves there, out[4] stays as written
    # r = D through the command's rank function, in the launch that checks both conversions and resumes one
    out["checked"] = mb.launch(cr.check_and_resume, 2, os.path.join(dense, f"iter_{STEPS:07d}"),
                               {4: os.path.join(out[4], f"iter_{STEPS:07d}")}, out[16], resumed, spamlang, STEPS + 2,
                               timeout=600)[0]
    return out


def _cli_capture(argv):
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def test_the_command_writes_a_low_rank_checkpoint(runs):
    code, text, err = runs["cli"]
    assert code == 0, err
    assert "low_rank r=4 head" in text and f"step {STEPS}" in text and "resume: megatron-bottleneck train" in text
    assert "the optimizer state is the checkpoint's but for the head's factors" in text
    for r in (16, 4):
        layout = read_layout(os.path.join(runs[r], f"iter_{STEPS:07d}"))
        assert layout.get("optimizer_saved", True) and layout["model"]["model.head_rank"] == r
        assert layout["optimizer_reset_params"] == ["chunk0.output_layer.input_proj", "chunk0.output_layer.weight"]
    sums = runs["checked"]["all_sums"]  # (||W_shard||^2, ||A_shard||^2) per TP rank: r = D keeps all of W
    assert len(sums) == 2 and all(a == pytest.approx(w, rel=1e-6) for w, a in sums)


def test_full_rank_reproduces_the_dense_losses(runs):
    c = runs["checked"]
    assert c[16]["head"] == "LowRankOutputLayer"
    torch.testing.assert_close(c[16]["losses"], c["dense_losses"], rtol=1e-5, atol=1e-5)
    assert c[16]["others"] == 0.0 and c[4]["others"] == 0.0  # the backbone and embedding copied exactly
    torch.testing.assert_close(c[16]["a"].double() @ c[16]["b"].double(), c["w"].double(), rtol=0, atol=1e-6)


def test_low_rank_is_the_best_rank_r_approximation(runs):
    c = runs["checked"]
    w = c["w"].double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    head = c[4]["a"].double() @ c[4]["b"].double()
    assert (s[3] - s[4]) / s[0] > 1e-3  # the rank-4 approximation is unique: the comparison means something
    torch.testing.assert_close(head, best, rtol=0, atol=1e-5)
    assert (head - w).norm() == pytest.approx(s[4:].norm().item(), rel=1e-5)  # Eckart-Young's error
    kept = float(s[:4].square().sum() / s.square().sum())
    assert f"keeps {100 * kept:.2f}%" in runs["cli"][1]
    assert float((c[4]["losses"] - c["dense_losses"]).abs().max()) > 1e-4  # rank 4 < D: another model


def test_the_converted_checkpoint_resumes_with_the_low_rank_head(runs):
    res = runs["checked"]["resume"]
    assert res["head"] == "LowRankOutputLayer" and res["rank"] == 4
    assert res["steps"] == [STEPS + 1, STEPS + 2]
    lines = [ln for ln in res["console"].splitlines() if "optimizer state reset" in ln]
    assert len(lines) == 1 and "for the head" in lines[0] and "every other parameter's kept" in lines[0], res["console"]
    assert f"at step {STEPS}" in res["console"]
    # the first step's loss (before its update) is the converted model's, loaded on its own at TP=1
    assert res["losses"][0] == pytest.approx(res["reference_first_loss"], rel=1e-5)
    assert res["losses"][1] == res["losses"][1] and res["losses"][1] < 2 * res["losses"][0]  # it trains on


@pytest.mark.parametrize("kind", ["optimizer", "nodist"])
def test_the_optimizer_state_is_kept_but_for_the_head(runs, kind):
    """What the resumed trainer loads: every non-head parameter's fp32 main weight, Adam moments and step are the
    dense checkpoint's (loaded by a trainer of its own; ``nodist``: a 2-step bf16 run without the distributed
    optimizer, its fp32 main weights apart from the model's, its state in memory); the head's factors A, B have zero moments and the step."""
    opt = runs["checked"][kind]
    steps = STEPS if kind == "optimizer" else 2
    assert set(opt["names"]) == set(opt["source_names"]) | {"output_layer.weight", "output_layer.input_proj"}
    assert opt["moments_nonzero"] > 0  # six steps of Adam: the comparison means something
    assert opt["kept_max_diff"] == 0.0 and opt["kept_steps"] == [float(steps)]
    assert sorted(opt["head"]) == ["output_layer.input_proj", "output_layer.weight"]
    assert all(v == [0.0, 0.0, float(steps)] for v in opt["head"].values())


@pytest.mark.parametrize("case", ["missing", "rank", "not_dense", "kind", "out", "megatron_lm"])
def test_bad_input_is_one_line_exit_2(runs, case, tmp_path):
    dense, tmp = runs["dense"], runs["tmp"]
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    (mlm / "latest_checkpointed_iteration.txt").write_text("6")
    argv = {"missing": [os.path.join(tmp, "nothing"), "--head", "low_rank:r=4"],
            "megatron_lm": [str(mlm), "--head", "low_rank:r=4"],
            "rank": [dense, "--head", "low_rank:r=17"],
            "not_dense": [runs[4], "--head", "low_rank:r=2"],
            "kind": [dense, "--head", "mos:k=2"],
            "out": [dense, "--head", "low_rank:r=4", "--out", runs[16]]}[case]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    code, _text, err = _cli_capture(["convert-head", *argv, "--device", "cpu"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert {"missing": "no checkpoint at", "rank": "exceeds the hidden size 16", "not_dense": "its head is low_rank",
            "kind": "writes a low_rank head", "out": "already holds a checkpoint",
            "megatron_lm": "no metadata.json: not a torch_dist checkpoint directory"}[case] in lines[0]
    assert not os.path.exists(tmp_path / "o")
