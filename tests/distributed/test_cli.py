"""The command line on real runs: sweep + report, probe of a checkpoint, progress lines, one-line errors
whichever rank raised them, options and overrides in any order."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_bottleneck.cli import main

from ..lanes import NOT_README_LANE, README_LANE
from megatron_bottleneck.report import load_runs

TINY = {"model": {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 8, "vocab_size": 64},
        "train": {"train_steps": 16, "global_batch_size": 16, "micro_batch_size": 8, "eval_interval": 4,
                  "log_interval": 8},
        "optim": {"lr": 0.02, "warmup_steps": 2},
        "checkpoint": {"save_interval": 8},
        "logging": {"tensorboard": False, "console": False},
        "probe": {"interval": 2, "rank_interval": 8, "rank_token_budget": 128}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = tmp / "out"
    assert main(["sweep", str(path), "--vocab-sizes", "64", "--head-ranks", "dense,2", "--lrs", "0.02",
                 "--workers", "2", "--out", str(out)]) == 0
    return tmp, out


def test_sweep_runs_and_report(sweep):
    tmp, out = sweep
    runs = load_runs(str(out))
    assert sorted(r.name for r in runs) == ["runs/V64_dense_lr0.02", "runs/V64_r2_lr0.02"]
    for r in runs:
        assert os.path.exists(os.path.join(r.path, "DONE"))
        assert [m["step"] for m in r.metrics] == list(range(1, 17))
        assert r.params["coverage"]["median"] > 0
    report = open(out / "report.md").read()
    assert "loss_by_vocab.png" in report and "destroyed_vs_vd.png" in report
    for png in ("loss_by_vocab.png", "destroyed_vs_vd.png", "rank_vs_tokens.png"):
        assert (out / png).stat().st_size > 1000
    dense = next(r for r in runs if r.params["head_rank"] is None)
    assert f"{dense.final('valid_loss'):.3f}" in report
    rank2 = next(r for r in runs if r.params["head_rank"] == 2)
    assert rank2.mean_probe("destroyed_ratio") > dense.mean_probe("destroyed_ratio")
    assert main(["report", str(out)]) == 0
    log = (out / "sweep.log").read_text().splitlines()  # one line per finished run
    assert len(log) == 2 and all(line.startswith(("[1/2]", "[2/2]")) and "finished" in line for line in log)


def test_probe_command_on_a_checkpoint(sweep, capsys):
    tmp, out = sweep
    ckpt = out / "runs" / "V64_dense_lr0.02" / "ckpt"
    assert main(["probe", str(ckpt), "--data", str(out / "data" / "V64_valid"), "--batches", "2",
                 "--out", str(tmp / "fig.json")]) == 0
    fig = json.load(open(tmp / "fig.json"))
    assert 0 < fig["destroyed_ratio"] < 1 and fig["numerical_rank"] >= 1


def _cli(*args, cwd=None):
    """The installed command line in a fresh process: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_bottleneck.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_batch_size_that_dp_cannot_split_is_one_line_before_spawning(tmp_path, spamlang):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], global_batch_size=24))))
    code, _, err = _cli("train", str(cfg), "--nproc", "2", f"data.train_prefix={spamlang['train_prefix']}")
    assert code == 2
    assert err.strip().splitlines() == ["error: train.global_batch_size=24 must be a multiple of train.micro_batch_size"
                                        " x data-parallel size (8 x 2 with 2 ranks): change the batch sizes or the "
                                        "number of ranks."]


def test_data_problems_are_one_line_before_spawning(tmp_path, spamlang):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    code, _, err = _cli("train", str(cfg), "data.train_prefix=/nonexistent/data")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: data: no indexed dataset at '/nonexistent/data' (missing /nonexistent/data.bin")
    code, _, err = _cli("train", str(cfg), f"data.train_prefix={spamlang['train_prefix']}", "model.vocab_size=32")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "but the model's vocabulary has 32 ids; set model.vocab_size >= 64" in err


def test_an_error_raised_inside_the_ranks_is_one_line(tmp_path, spamlang):
    if README_LANE:  # the CLI's error path and the trainer's resume check are the same code in both lanes
        pytest.skip("runs in the megatron-core 0.19 lane only (the same code in both lanes), to keep CI within its time budget")
    # A check only the ranks can make: resuming a checkpoint of another model (every rank raises it; the
    # launcher waits for each rank's report, so --debug shows rank 0's whichever rank failed first).
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    ckpt = tmp_path / "ckpt"
    over = [f"data.train_prefix={spamlang['train_prefix']}", f"checkpoint.dir={ckpt}", "train.train_steps=2",
            f"logging.dir={tmp_path / 'logs'}", "train.eval_interval=0"]
    assert _cli("train", str(cfg), *over)[0] == 0
    code, _, err = _cli("train", str(cfg), "--nproc", "2", *over, "train.train_steps=4", "model.head_rank=4")
    assert code == 2 and "Traceback" not in err  # the ranks' own output is Megatron's warnings, once each
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume from "), err[-3000:]
    assert "another model (model.head_rank: saved " in lines[0] and "now 4" in lines[0], lines
    code, _, err = _cli("--debug", "train", str(cfg), "--nproc", "2", *over, "train.train_steps=4", "model.head_rank=4")
    assert code == 2 and "--- rank 0 ---" in err and "--- rank 1 ---" in err and "Traceback" in err


def test_bench_train_reports_shares_mfu_and_memory_per_head_rank(tmp_path, spamlang):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "bench.json"
    code, stdout, err = _cli("bench-train", str(cfg), "--nproc", "2", f"data.train_prefix={spamlang['train_prefix']}",
                             "--steps", "3", "--warmup", "1", "--head-ranks", "dense,2", "--out", str(out),
                             "train.micro_batch_size=8", "probe.interval=1")
    assert code == 0, err[-3000:]
    rows = json.load(open(out))
    assert [r["head_rank"] for r in rows] == [None, 2] and [r["fp8"] for r in rows] == [None, None] and "| dense | off | 2 |" in stdout and "| 2 | off | 2 |" in stdout
    for r in rows:
        assert r["world"] == 2 and len(r["per_rank"]) == 2 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1 and r["peak_gflops_min"] > 0 and r["peak_memory_mib_max"] > 0
        assert r["shares"]["head_loss"] > 0 and r["shares"]["probe"] > 0 and r["shares"]["optimizer"] > 0
        assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["flops_per_token"] < rows[0]["flops_per_token"]  # the rank-2 head has fewer FLOPs


def test_torchrun_without_a_gpu_stops_in_one_line_unless_cpu_is_asked_for(tmp_path, spamlang):
    if not README_LANE:  # torchrun and the trainer's device check are the same code in both lanes
        pytest.skip(NOT_README_LANE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    env = {k: v for k, v in os.environ.items() if k not in ("MB_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    args = ["train", str(cfg), f"data.train_prefix={spamlang['train_prefix']}", "train.train_steps=1",
            f"logging.dir={tmp_path / 'logs'}", "train.eval_interval=0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "-m", "megatron_bottleneck.cli", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]  # local rank 0 says it; rank 1 exits quietly with status 2
    assert errors[0].startswith("error: no CUDA GPU is visible to this torchrun / Slurm job") and "MB_CPU=1" in errors[0]
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()
    # the same flags with train.device=cpu train on CPU ranks (asked for on purpose)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                           "--standalone", "-m", "megatron_bottleneck.cli", *args, "train.device=cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished at step 1" in proc.stdout


@pytest.mark.parametrize("extra", ["transformers", "gguf"])
def test_measure_without_an_hf_extra_imports_and_stops_in_one_line(tmp_path, extra):
    """A fresh interpreter where the extra is not importable from the start (hidden before megatron_bottleneck is
    imported): nothing on the CLI's import path needs it, and `measure` says what to install in one line.
    (tests/unit/test_measure*.py check the same lines in process.)"""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"tokens": [1, 2, 3, 4]}) for _ in range(3)) + "\n")
    model = "gpt2"
    if extra == "gguf":
        model = str(tmp_path / "m.gguf")
        (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code = (f"import sys; sys.modules[{extra!r}] = None; from megatron_bottleneck.cli import main; "
            f"sys.exit(main(['measure', {model!r}, '--data', {str(docs)!r}, '--out', {str(tmp_path / 'out')!r}]))")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "megatron-bottleneck[hf]" in errors[0]
    assert ("needs transformers" if extra == "transformers" else "is a GGUF file; reading it needs gguf") in errors[0]
