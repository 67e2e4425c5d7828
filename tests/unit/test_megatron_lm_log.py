"""Megatron-LM's stdout parsed into the rank-sweep report, on real logs.

``data/megatron_lm_core_v0.*_requeued.log.gz`` are the ``logs/megatron_lm.node0.log`` files that
``launch/megatron_lm.sbatch`` wrote on the local two-node Slurm (tests/slurm/cluster.py) for Megatron-LM's
unchanged ``pretrain_gpt.py`` (core_v0.16.1 with megatron-core 0.16.1 on Python 3.11, head rank 4, 60
iterations; core_v0.19.0 with 0.19.2 on Python 3.12, head rank 8, 30 iterations), each sent USR1 mid-run:
Megatron-LM saved, the job requeued itself and the rerun appended to the same log (two argument dumps).
``data/megatron_lm_core_v0.*_probe.jsonl.gz`` are their probe.jsonl files.
"""
import gzip
import os
import shutil

import pytest

from megatron_bottleneck.report import load_runs, parse_megatron_lm_log, write_report

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
V16 = os.path.join(DATA, "megatron_lm_core_v0.16.1_requeued.log.gz")
V19 = os.path.join(DATA, "megatron_lm_core_v0.19.0_requeued.log.gz")
PROBE16 = os.path.join(DATA, "megatron_lm_core_v0.16.1_probe.jsonl.gz")
PROBE19 = os.path.join(DATA, "megatron_lm_core_v0.19.0_probe.jsonl.gz")


def _text(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def _unpack(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with gzip.open(src, "rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g)


def test_core_v0_16_requeued_log():
    p = parse_megatron_lm_log(_text(V16))
    assert p["starts"] == 2  # the first run and the rerun after the requeue
    a = p["args"]
    assert (a["hidden_size"], a["lm_head_rank"], a["seq_length"], a["global_batch_size"], a["train_iters"]) == \
        (64, 4, 32, 4, 60)
    assert a["lr"] == 1e-3 and a["exit_signal_handler"] is True and a["load"].endswith("/checkpoints")
    assert (p["vocab_size"], p["padded_vocab_size"]) == (1001, 1024)  # NullTokenizer: 1000 + EOD
    rows = p["metrics"]
    assert [r["step"] for r in rows] == list(range(1, 61))  # 1-4 from the first run, 5-60 from the rerun
    assert all(r["tokens"] == 128 * r["step"] for r in rows)  # consumed samples x 32
    by = {r["step"]: r for r in rows}
    # the lines " iteration 4/ 60 | ... lm loss: 6.881265E+00 ..." (first run) and "5/ 60 ... 6.912074E+00"
    assert by[4]["loss"] == 6.881265 and by[5]["loss"] == 6.912074 and by[60]["loss"] == 6.168812
    assert by[1]["lr"] == 5e-4 and by[1]["grad_norm"] == 0.912
    # evaluation during training every 20 iterations; the final "on validation/test set" lines not used
    assert {s: r["valid_loss"] for s, r in by.items() if "valid_loss" in r} == \
        {20: 6.740041, 40: 6.380711, 60: 6.160824}


def test_core_v0_19_requeued_log():
    p = parse_megatron_lm_log(_text(V19))
    assert p["starts"] == 2
    assert (p["args"]["hidden_size"], p["args"]["lm_head_rank"], p["args"]["train_iters"]) == (64, 8, 30)
    # 0.19 prints the padded-vocab line through its logger ("INFO:megatron.core.tokenizers...")
    assert (p["vocab_size"], p["padded_vocab_size"]) == (1000, 1024)
    rows = {r["step"]: r for r in p["metrics"]}
    assert sorted(rows) == list(range(1, 31)) and rows[30]["tokens"] == 120 * 32
    assert rows[9]["loss"] == 6.931141 and rows[10]["loss"] == 6.87724 and rows[30]["loss"] == 6.743236
    assert {s: r["valid_loss"] for s, r in rows.items() if "valid_loss" in r} == \
        {10: 6.835909, 20: 6.73462, 30: 6.561895}


def test_report_from_megatron_lm_run_dirs_next_to_a_trainer_run(tmp_path):
    """Two Megatron-LM run dirs (as launch/megatron_lm_rank_sweep.sbatch lays them out) and one of our
    trainer's: the kind is detected per directory, and all three land in the same rank-sweep report."""
    pytest.importorskip("matplotlib")
    root = tmp_path / "sweep"
    _unpack(V16, str(root / "r4" / "logs" / "megatron_lm.node0.log"))
    _unpack(PROBE16, str(root / "r4" / "logs" / "probe.jsonl"))
    # a two-node run: the argument dump (rank 0) and the iteration lines (last rank) in different files
    text = _text(V19).splitlines(keepends=True)
    end = next(i for i, line in enumerate(text) if "end of arguments" in line) + 1
    (root / "r8" / "logs").mkdir(parents=True)
    (root / "r8" / "logs" / "megatron_lm.node0.log").write_text("".join(text[:end]))
    (root / "r8" / "logs" / "megatron_lm.node1.log").write_text("".join(text[end:]))
    _unpack(PROBE19, str(root / "r8" / "logs" / "probe.jsonl"))
    trainer = root / "r16" / "logs"
    trainer.mkdir(parents=True)
    (trainer / "config.yaml").write_text("model: {vocab_size: 1001, hidden_size: 64, head_rank: 16}\n"
                                         "optim: {lr: 0.001}\n")
    (trainer / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "tokens": {128 * i}, "loss": {7 - 0.02 * i}}}\n'
                                                   for i in range(1, 61)))
    runs = {r.name: r for r in load_runs(str(root))}
    assert {n: r.params["kind"] for n, r in runs.items()} == {"r4": "megatron-lm", "r8": "megatron-lm",
                                                               "r16": "trainer"}
    assert (runs["r4"].rank, runs["r4"].vocab, runs["r4"].hidden, runs["r8"].rank, runs["r8"].vocab) == \
        (4, 1001, 64, 8, 1000)
    assert [r["step"] for r in runs["r8"].metrics] == list(range(1, 31))
    assert [r["step"] for r in runs["r4"].probe] == list(range(60))
    assert [r["step"] for r in runs["r8"].probe] == list(range(30))
    report = open(write_report(str(root))).read()
    assert "(2 Megatron-LM, 1 megatron-bottleneck trainer)" in report
    rows = [line for line in report.splitlines() if line.startswith("| r") and not line.startswith("| run ")]
    assert [line.split("|")[1].strip() for line in rows] == ["r8", "r4", "r16"]  # by V: 1000, 1001, 1001
    r4 = rows[1].split("|")
    assert r4[2].strip() == "1001" and r4[4].strip() == "4" and r4[8].strip() == "6.161"  # final valid loss
    assert r4[9].strip() != "-"  # the probe's destroyed ratio
    assert "## Head-rank sweep" in report and "| 4 |" in report and "| 8 |" in report
    assert "Rank of the logit gradient" in report  # the probe's rank curve (rank_interval 4)
    for png in ("loss_by_rank.png", "destroyed_vs_rank.png", "rank_vs_tokens.png"):
        assert (root / png).exists()


def test_a_run_dir_without_argument_dump_is_one_error(tmp_path):
    text = _text(V16).splitlines(keepends=True)
    end = max(i for i, line in enumerate(text) if "end of arguments" in line) + 1
    (tmp_path / "r4" / "logs").mkdir(parents=True)
    (tmp_path / "r4" / "logs" / "megatron_lm.node0.log").write_text("".join(text[end:]))
    with pytest.raises(ValueError, match="no Megatron-LM argument dump"):
        load_runs(str(tmp_path))
