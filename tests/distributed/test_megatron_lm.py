"""Megatron-LM's real ``pretrain_gpt.py`` on CPU/gloo with the plugin (head, probe, CPU patches).

Runs the unchanged script from ``../shared/megatron-lm/<tag>`` (relative to the repository root; the
tag matching the installed megatron-core) through the zero-edit runner
``python -m megatron_bottleneck.megatron_lm``, as subprocesses (``torch.distributed.run`` for 2 ranks).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.lanes import MEGATRON_CORE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, "..", "shared", "megatron-lm")
DEPS = ("six", "regex", "pydantic", "triton", "pybind11")


def _mlm_dir():
    try:
        from importlib.metadata import version

        v = version("megatron-core")
    except Exception:
        return None, "megatron-core is not installed"
    tag = {"0.16": "core_v0.16.1", "0.19": "core_v0.19.0"}.get(".".join(v.split(".")[:2]))
    if tag is None:
        return None, f"no Megatron-LM snapshot for megatron-core {v}"
    path = os.path.normpath(os.path.join(SHARED, tag))
    if not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        return None, f"Megatron-LM snapshot {path} is absent"
    return path, ""


MLM, _why = _mlm_dir()
HYBRID_SCRIPT = os.path.join(MLM, "pretrain_hybrid.py") if MLM else ""
needs_hybrid_script = pytest.mark.skipif(not os.path.isfile(HYBRID_SCRIPT), reason=(
    f"no {HYBRID_SCRIPT or 'pretrain_hybrid.py'}: Megatron-LM's hybrid training is core_v0.19 (megatron-core >= 0.19)"))
_missing = [d for d in DEPS if importlib.util.find_spec(d) is None]
pytestmark = [
    pytest.mark.skipif(MLM is None, reason=_why),
    pytest.mark.skipif(bool(_missing), reason=f"Megatron-LM's training code needs {', '.join(_missing)} "
                                              "(pip install six regex pydantic triton pybind11)"),
]

BASE = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --distributed-backend gloo "
    "--transformer-impl local --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 "
    "--lr 1e-3 --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion "
    "--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --use-cpu-initialization "
    "--attention-dropout 0.0 --hidden-dropout 0.0 --log-interval 1 --eval-iters 0 --eval-interval 1000 "
    "--seed 1234"
).split()
HEAD = ["--untie-embeddings-and-output-weights", "--lm-head-rank", "16", "--probe-interval", "1"]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
PROBE_LINE = re.compile(r"megatron-bottleneck: gradient probe on .*vocabulary (\d+), padded (\d+); "
                        r"starting at step (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args, *, train_iters: int = 6, env=None, pythonpath_first=None, timeout=900, script=None,
        entry="pretrain_gpt.py", base=BASE):
    """Run Megatron-LM's ``entry`` (pretrain_gpt.py) through the zero-edit runner, or an edited copy ``script``
    directly (one process); returns (returncode, combined output). ``train_iters=None``: ``args`` say how long."""
    cmd = [sys.executable]
    if nproc > 1:
        # --standalone: torchrun's own rendezvous binds a port it picks (no free-port race with other jobs)
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if script is None:
        cmd += ["-m", "megatron_bottleneck.megatron_lm", os.path.join(MLM, entry)]
    else:
        cmd += [str(script)]
    cmd += [*base, *(["--train-iters", str(train_iters)] if train_iters else []), *args]
    e = dict(os.environ)
    e.pop("WORLD_SIZE", None)
    if script is not None and nproc == 1:
        e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    paths = [p for p in (pythonpath_first, REPO, MLM) if p]
    e["PYTHONPATH"] = os.pathsep.join(paths + [e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    e.update(env or {})
    p = subprocess.run(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout


def losses(out: str):
    return {int(i): float(v) for i, v in LOSS.findall(out)}


def records(log_dir):
    with open(os.path.join(log_dir, "probe.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ok(rc, out):
    assert rc == 0, out[-4000:]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """The same run (low-rank head, probe) at TP=1 and TP=2; TP=2 saves a checkpoint at step 6."""
    root = tmp_path_factory.mktemp("mlm")
    out = {}
    for tp in (1, 2):
        log_dir = root / f"probe_tp{tp}"
        extra = ["--tensor-model-parallel-size", str(tp), "--probe-log-dir", str(log_dir)]
        if tp == 2:
            extra += ["--save", str(root / "ckpt"), "--save-interval", "6", "--ckpt-format", "torch_dist",
                      "--tensorboard-dir", str(root / "tb")]
        rc, text = run(tp, HEAD + extra)
        out[tp] = (rc, text, log_dir)
    out["ckpt"] = root / "ckpt"
    out["tb"] = root / "tb"
    out["root"] = root
    return out


def test_stock_script_trains_unchanged():
    """(a, f) the unchanged script through the runner, without any plugin argument: stock training."""
    rc, out = run(1, [])
    _ok(rc, out)
    ls = losses(out)
    assert sorted(ls) == list(range(1, 7)), out[-3000:]
    assert "installed a rank" not in out and "gradient probe on" not in out
    assert out.count("megatron-bottleneck: head: Megatron's dense output layer; loss: Megatron's cross-entropy; "
                     "probe: off") == 1


def test_low_rank_head_trains_and_tp_agree(tp_runs):
    """(a, b) the patched run trains; TP=1 and TP=2 losses agree."""
    for tp in (1, 2):
        _ok(*tp_runs[tp][:2])
        assert "installed a rank-16 low-rank LM head" in tp_runs[tp][1]
        assert tp_runs[tp][1].count("installed a rank-16") == 1  # logged once per run
    l1, l2 = losses(tp_runs[1][1]), losses(tp_runs[2][1])
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for i in l1:
        assert l2[i] == pytest.approx(l1[i], rel=1e-5), (i, l1, l2)


def test_probe_equal_across_tp_on_real_vocab(tp_runs):
    """(c) probe figures equal across TP, computed on the real (unpadded) vocabulary."""
    r1, r2 = records(tp_runs[1][2]), records(tp_runs[2][2])
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(6))
    m = PROBE_LINE.search(tp_runs[2][1])
    assert m, tp_runs[2][1][-3000:]
    vocab, padded = int(m.group(1)), int(m.group(2))
    assert vocab in (1000, 1001) and padded % 128 == 0 and padded > vocab
    for a, b in zip(r1, r2):
        assert b["probe/isotropic_baseline"] == pytest.approx(a["probe/isotropic_baseline"], rel=1e-12)
        assert b["probe/destroyed_ratio"] == pytest.approx(a["probe/destroyed_ratio"], rel=1e-5)
        assert b["probe/hidden_grad_norm"] == pytest.approx(a["probe/hidden_grad_norm"], rel=1e-6)
        # grad_norm / visible_cosine: TP=1 and TP=2 differ by 1e-4..2.3e-4 relative (measured
        # 2026-11-30, megatron-core 0.16.1) while the losses agree to 1e-6: reported, not asserted.
        # isotropic baseline = sqrt(1 - r / (V - 1)) with V the real vocabulary, not the padded one
        assert a["probe/isotropic_baseline"] == pytest.approx((1 - 16 / (vocab - 1)) ** 0.5, rel=1e-12)
        assert a["probe/isotropic_baseline"] != pytest.approx((1 - 16 / (padded - 1)) ** 0.5, rel=1e-9)


def test_probe_figures_in_megatron_tensorboard(tp_runs):
    """Probe figures also go to Megatron-LM's own TensorBoard writer (it lives on the last rank)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _ok(*tp_runs[2][:2])
    acc = EventAccumulator(str(tp_runs["tb"]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "probe/destroyed_ratio" in tags and "lm loss" in tags, tags
    assert [e.step for e in acc.Scalars("probe/destroyed_ratio")] == list(range(6))
    assert not (tp_runs[2][2] / "tensorboard").exists()  # no second writer of our own


def test_data_and_pipeline_parallel_runs(tp_runs, tmp_path):
    """DP=2 (2 ranks, TP=1) gives the TP=1 run's losses; PP=2 trains, its last stage probes."""
    rc, text = run(2, HEAD + ["--probe-log-dir", str(tmp_path / "dp2")])
    _ok(rc, text)
    one = losses(tp_runs[1][1])
    two = losses(text)
    assert sorted(two) == sorted(one)
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5)
    rc, text = run(2, HEAD + ["--pipeline-model-parallel-size", "2", "--probe-log-dir", str(tmp_path / "pp2")])
    _ok(rc, text)
    pp = losses(text)
    assert sorted(pp) == list(range(1, 7)) and all(v == v and v > 0 for v in pp.values())
    rows = records(tmp_path / "pp2")
    assert [r["step"] for r in rows] == list(range(6)) and all(0 < r["probe/destroyed_ratio"] < 1 for r in rows)


def test_sequence_parallel_on_cpu_equals_tp1(tp_runs, tmp_path):
    """TP=2 + --sequence-parallel on CPU (the local spec's torch norm refuses SP; CPU mode builds an SP-capable
    norm instead) gives the TP=1 run's losses, and the probe runs on the sequence-sharded hidden states."""
    rc, text = run(2, HEAD + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--probe-log-dir", str(tmp_path / "sp")])
    _ok(rc, text)
    one, sp = losses(tp_runs[1][1]), losses(text)
    assert sorted(sp) == sorted(one) == list(range(1, 7))
    for it in one:
        assert sp[it] == pytest.approx(one[it], rel=1e-5), (it, one, sp)
    for a, b in zip(records(tp_runs[1][2]), records(tmp_path / "sp")):
        assert b["probe/destroyed_ratio"] == pytest.approx(a["probe/destroyed_ratio"], rel=1e-5)


def test_save_tp2_load_tp1_probe_continues(tp_runs, tmp_path):
    """(d) a TP=2 checkpoint loads at TP=1; the probe's step continues from the loaded iteration."""
    _ok(*tp_runs[2][:2])
    log_dir = tmp_path / "probe"
    rc, out = run(1, HEAD + ["--load", str(tp_runs["ckpt"]), "--no-load-optim", "--no-load-rng",
                             "--ckpt-format", "torch_dist", "--probe-log-dir", str(log_dir)],
                  train_iters=8)
    _ok(rc, out)
    assert sorted(losses(out)) == [7, 8], out[-3000:]
    m = PROBE_LINE.search(out)
    assert m and int(m.group(3)) == 6
    assert [r["step"] for r in records(log_dir)] == [6, 7]


def test_mixture_of_softmaxes_head_trains_and_is_probed(tmp_path):
    """A non-linear head through Megatron-LM's own loop (--lm-head-type mos, fused loss) with the probe on: its
    general path logs the destroyed ratio and the update cosine every step, under the linear heads' names. Under
    batch-size ramp-up (2 samples a step, then 4: 1, then 2 micro-batches of 64 tokens) each probe step is
    Megatron-LM's step (the train_step wrap opens it with that step's get_num_microbatches()): its token sample,
    up to 96 tokens, takes 64 tokens from a 1-micro-batch step and 96 from a 2-micro-batch one."""
    log_dir = tmp_path / "probe"
    base = list(BASE)
    if MLM.endswith("core_v0.19.0"):  # ignores --rampup-batch-size: its step schedule replaces the global batch
        i = base.index("--global-batch-size")
        del base[i:i + 2]
        rampup = ["--step-batch-size-schedule", "0:2 128:4"]  # thresholds in tokens: 4 samples of 32
    else:
        rampup = ["--rampup-batch-size", "2", "2", "4"]
    rc, out = run(1, ["--untie-embeddings-and-output-weights", "--lm-head-type", "mos", "--lm-head-options", "k=2",
                      "--lm-head-fused-loss", "--probe-interval", "1", "--probe-update-interval", "2",
                      "--probe-general-tokens", "96", "--probe-general-iterations", "8",
                      *rampup, "--train-samples", "12", "--probe-log-dir", str(log_dir)], train_iters=None, base=base)
    _ok(rc, out)
    assert "head: mos:k=2" in out, out[-3000:]
    ls = losses(out)
    assert sorted(ls) == [1, 2, 3, 4] and all(0 < v < 20 for v in ls.values())  # 12 samples: 2 + 2 + 4 + 4
    r = records(log_dir)
    assert [x["step"] for x in r] == [0, 1, 2, 3] and "switched off" not in out
    for x in r:
        assert 0 < x["probe/destroyed_ratio"] <= 1 and x["probe/grad_norm"] > 0 and x["probe/cg_residual"] >= 0
    assert [x["probe/probe_tokens"] for x in r] == [64, 64, 96, 96]
    assert [("probe/update_cosine" in x) for x in r] == [True, False, True, False]


FAKE_TRAINING_SCRIPT = """
import os
with open(os.environ["IMPORT_LOG"], "a") as f:  # every import of this script: __main__, or __mp_main__ in a spawn
    f.write(__name__ + "\\n")
if __name__ == "__main__":  # what megatron-core's torch_dist writer does at a run's first save
    if os.environ.get("START_HELPERS"):  # what the trainer does before training
        from megatron_bottleneck.integrations.checkpoint_writer import start_writer_helpers
        assert start_writer_helpers()
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fs
    get = getattr(fs, "get_write_results_queue", None) or fs._get_write_results_queue
    get().put(1)
"""


def test_the_first_save_does_not_import_the_training_script_again(tmp_path):
    """megatron-core's torch_dist writer starts a spawn-context Manager at the first save; a spawned process
    re-imports ``__main__``. Run directly, the script is imported twice; through the runner with ``--save`` the
    queue is already started (before the script ran) and the script is imported once; so with the trainer's
    ``start_writer_helpers()`` called in the script."""
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAINING_SCRIPT)
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, MLM]), OMP_NUM_THREADS="1")
    e.pop("WORLD_SIZE", None)
    runs = {"direct": [sys.executable, str(script)],
            "direct, helpers started": [sys.executable, str(script)],
            "runner": [sys.executable, "-m", "megatron_bottleneck.megatron_lm", str(script), "--save",
                       str(tmp_path / "ckpt")],
            "runner, torch format": [sys.executable, "-m", "megatron_bottleneck.megatron_lm", str(script), "--save",
                                     str(tmp_path / "ckpt"), "--ckpt-format", "torch"]}
    imports = {}
    for name, cmd in runs.items():
        e["IMPORT_LOG"] = str(tmp_path / f"{len(imports)}.log")
        e["START_HELPERS"] = "1" if "helpers started" in name else ""
        p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (name, p.stderr[-3000:])
        imports[name] = sorted(open(e["IMPORT_LOG"]).read().split())
    assert imports == {"direct": ["__main__", "__mp_main__"], "direct, helpers started": ["__main__"],
                       "runner": ["__main__"],
                       "runner, torch format": ["__main__", "__mp_main__"]}  # no queue started: not torch_dist


def test_tied_embeddings_refused_in_one_line():
    """(e) tied embeddings: our message once, from one rank, no Python traceback from the ranks."""
    rc, out = run(2, ["--tensor-model-parallel-size", "2", "--lm-head-rank", "16"])
    assert rc != 0
    lines = [l for l in out.splitlines() if "megatron-bottleneck: error:" in l]
    assert len(lines) == 1, out[-3000:]
    assert "--untie-embeddings-and-output-weights" in lines[0]
    assert "HeadConfigError" not in out
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out


def test_without_tensorboard_jsonl_complete_and_one_warning(tmp_path):
    """(g) tensorboard not importable: every record still reaches the JSONL, one warning."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _NoTensorboard:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorboard" or name.startswith("tensorboard."):
                    raise ModuleNotFoundError("No module named 'tensorboard' (hidden by the test)")
                return None
        sys.meta_path.insert(0, _NoTensorboard())
    """))
    log_dir = tmp_path / "probe"
    rc, out = run(1, HEAD + ["--probe-log-dir", str(log_dir)], pythonpath_first=str(site))
    _ok(rc, out)
    assert [r["step"] for r in records(log_dir)] == list(range(6))
    assert out.count("megatron-bottleneck: warning: tensorboard is not installed") == 1, out[-3000:]
    assert not (log_dir / "tensorboard").exists()


def test_one_line_edit_of_pretrain_gpt(tmp_path):
    """The minimal edit: one line after ``import torch`` in pretrain_gpt.py, run with plain python."""
    src = open(os.path.join(MLM, "pretrain_gpt.py")).read()
    with open(os.path.join(REPO, "docs", "megatron-lm.md"), encoding="utf-8") as f:  # the docs' ```diff block
        diff = re.search(r"```diff\n(.*?)```", f.read(), re.S).group(1).splitlines()
    assert diff[0] == " import torch" and len(diff) == 2 and diff[1].startswith("+")
    line = diff[1][1:]
    assert line == "import megatron_bottleneck.megatron_lm as mbl; mbl.patch()"
    edited = src.replace("\nimport torch\n", f"\nimport torch\n{line}\n", 1)
    assert edited.count(line) == 1
    script = tmp_path / "pretrain_gpt.py"
    script.write_text(edited)
    log_dir = tmp_path / "probe"
    rc, out = run(1, [*HEAD, "--probe-log-dir", str(log_dir)], train_iters=3, script=script)
    _ok(rc, out)
    assert "installed a rank-16 low-rank LM head" in out
    assert sorted(losses(out)) == [1, 2, 3]
    assert [r["step"] for r in records(log_dir)] == [0, 1, 2]


def test_rank_above_hidden_refused_in_one_line():
    """A head rank above the hidden size: our message once, exit status 2, no traceback."""
    rc, out = run(1, ["--untie-embeddings-and-output-weights", "--lm-head-rank", "128"], train_iters=1)
    assert rc == 2, out[-3000:]
    lines = [l for l in out.splitlines() if "megatron-bottleneck: error:" in l]
    assert len(lines) == 1 and "exceeds the hidden size 64" in lines[0], out[-3000:]
    assert "Traceback" not in out


def test_bad_flags_refused_before_megatron_parses_its_arguments():
    """Rank 0 used to train a dense head silently; the fused loss with Megatron's fused cross-entropy mixed two
    losses. Each is one line, before Megatron-LM's argument dump; a good run logs its head/loss/probe once."""
    for flags, text in ((["--untie-embeddings-and-output-weights", "--lm-head-rank", "0"], "--lm-head-rank must be >= 1"),
                        (["--lm-head-fused-loss", "--cross-entropy-loss-fusion"], "--cross-entropy-loss-fusion")):
        rc, out = run(1, flags, train_iters=1)
        assert rc == 2, out[-3000:]
        lines = [l for l in out.splitlines() if "megatron-bottleneck: error:" in l]
        assert len(lines) == 1 and text in lines[0], out[-3000:]
        assert "Traceback" not in out and "---- arguments ----" not in out


def test_explicit_edit_of_pretrain_gpt(tmp_path):
    """The explicit edit documented in docs/megatron_lm.md (no patch() of pretrain): wrapped model
    provider (core_v0.16) or pre-wrap hook (core_v0.19), wrapped forward_step, chained arguments.
    On CPU the one call enable_cpu_mode() covers megatron/training too."""
    src = open(os.path.join(MLM, "pretrain_gpt.py")).read()
    setup = ("import megatron_bottleneck.megatron_lm as mbl\n"
             "import megatron_bottleneck as mb; mb.enable_cpu_mode()\n")
    edits = [("\nimport torch\n", "\nimport torch\n" + setup),
             ("        forward_step,\n", "        mbl.wrap_forward_step(forward_step),\n"),
             ("extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,",
              "extra_args_provider=mbl.extra_args_provider(add_modelopt_args if has_nvidia_modelopt else None),")]
    if "partial(model_provider, gpt_builder),\n" in src:  # core_v0.16: pretrain takes a model provider
        edits.append(("        partial(model_provider, gpt_builder),\n",
                      "        mbl.wrap_model_provider(partial(model_provider, gpt_builder)),\n"))
    else:  # core_v0.19: the model is built from the config container
        edits.append(("    full_config = pretrain_cfg_container_from_args(args, model_cfg)\n",
                      "    model_cfg.pre_wrap_hooks.append(mbl.install_head_from_args)\n"
                      "    full_config = pretrain_cfg_container_from_args(args, model_cfg)\n"))
    for old, new in edits:
        assert src.count(old) == 1, old
        src = src.replace(old, new)
    script = tmp_path / "pretrain_gpt.py"
    script.write_text(src)
    log_dir = tmp_path / "probe"
    rc, out = run(1, [*HEAD, "--probe-log-dir", str(log_dir)], train_iters=3, script=script)
    _ok(rc, out)
    assert "megatron-bottleneck: patched" not in out
    assert out.count("installed a rank-16 low-rank LM head") == 1
    assert sorted(losses(out)) == [1, 2, 3]
    assert [r["step"] for r in records(log_dir)] == [0, 1, 2]


def test_cpu_mode_patches_megatron_training_and_undoes_it(monkeypatch):
    """One call, enable_cpu_mode(), also patches megatron/training when it imports; every target is an
    existing function that the patch wraps; disable_cpu_mode() restores each original."""
    monkeypatch.syspath_prepend(MLM)
    import importlib

    import megatron_bottleneck as mb
    from megatron_bottleneck.integrations import cpu, megatron_training_cpu

    patches = megatron_training_cpu.training_patches()
    targets = {p.target for p in patches}
    assert {"megatron.training.initialize._warmup_jit_function", "megatron.training.initialize._initialize_distributed",
            "megatron.training.training.get_model"} <= targets
    originals = {p.target: getattr(importlib.import_module(p.module), p.attr) for p in patches}
    assert all(p.why and "\n" not in p.why for p in patches)
    with mb.cpu_mode():
        assert targets <= set(cpu.cpu_mode_patches())
        for p in patches:
            now = getattr(importlib.import_module(p.module), p.attr)
            assert now is not originals[p.target] and now.__wrapped__ is originals[p.target]
    for p in patches:
        assert getattr(importlib.import_module(p.module), p.attr) is originals[p.target]


def test_cpu_mode_skips_the_jit_warmup_only_without_cuda(monkeypatch):
    """The warmup compiles GPU fusions (and reads Megatron's global args): on CPU the patched function returns
    without calling it; with CUDA (faked) it is the original, which here fails on the unset args."""
    monkeypatch.syspath_prepend(MLM)
    import importlib

    import megatron_bottleneck as mb

    initialize = importlib.import_module("megatron.training.initialize")
    with pytest.raises(AssertionError, match="args"):
        initialize._warmup_jit_function()  # unpatched: Megatron's global args are not initialized
    with mb.cpu_mode():
        assert initialize._warmup_jit_function() is None
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        with pytest.raises(AssertionError, match="args"):
            initialize._warmup_jit_function()


# ------------------------------------------------------------------ measure on the saved checkpoint
def _dcp_tensors(iter_dir, names):
    """The named global tensors of a torch_dist checkpoint, read with torch's own DCP reader (no megatron)."""
    import torch
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(iter_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {n: torch.empty(meta[n].size, dtype=meta[n].properties.dtype) for n in names}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {n: t.double() for n, t in state.items()}


def _reference_forward(w, ids, heads):
    """Float64 GPT forward of the saved weights (pre-LN, learned positions, GELU MLP, causal attention; the
    layers stacked on dim 0 as Megatron-LM saves them): the final hidden states [T, D]."""
    import torch
    import torch.nn.functional as F

    t = len(ids)
    x = w["embedding.word_embeddings.weight"][ids] + w["embedding.position_embeddings.weight"][:t]
    d = x.shape[1]
    hn = d // heads
    ln = lambda v, key, i: F.layer_norm(v, (d,), w[key + "_weight"][i], w[key + "_bias"][i], 1e-5)  # noqa: E731
    pre = "decoder.layers."
    for i in range(w[pre + "self_attention.linear_qkv.weight"].shape[0]):
        h = ln(x, pre + "self_attention.linear_qkv.layer_norm", i)
        qkv = (h @ w[pre + "self_attention.linear_qkv.weight"][i].t() + w[pre + "self_attention.linear_qkv.bias"][i])
        q, k, v = qkv.view(t, heads, 3, hn).unbind(2)  # Megatron's per-head [q, k, v] blocks
        att = torch.einsum("thd,shd->hts", q, k) / hn ** 0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(t, d)
        proj = pre + "self_attention.linear_proj."
        x = x + o @ w[proj + "weight"][i].t() + w[proj + "bias"][i]
        h = ln(x, pre + "mlp.linear_fc1.layer_norm", i)
        h = F.gelu(h @ w[pre + "mlp.linear_fc1.weight"][i].t() + w[pre + "mlp.linear_fc1.bias"][i])
        x = x + h @ w[pre + "mlp.linear_fc2.weight"][i].t() + w[pre + "mlp.linear_fc2.bias"][i]
    return F.layer_norm(x, (d,), w["decoder.final_layernorm.weight"], w["decoder.final_layernorm.bias"], 1e-5)


def _measure_cli(args):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([REPO, e.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # no Megatron-LM on it
    e["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, "-m", "megatron_bottleneck.cli", "measure", *args, "--no-progress"], cwd=REPO,
                       env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def _checkpoint_names(iter_dir):
    from torch.distributed.checkpoint import FileSystemReader

    return [n for n, m in FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata.items()
            if (n.startswith(("embedding.", "decoder.", "output_layer.")) and "_extra_state" not in n)]


def _gpt_weights(iter_dir):
    return _dcp_tensors(iter_dir, _checkpoint_names(iter_dir))


def _hybrid_weights_as_gpt(iter_dir, pattern="*-*-"):
    """A HybridModel checkpoint's tensors under the GPT names of :func:`_reference_forward`: the attention layers'
    (at the pattern's ``*``) and the MLP layers' (at its ``-``) tensors stacked on dim 0, final_norm as
    final_layernorm."""
    import torch

    raw = _dcp_tensors(iter_dir, _checkpoint_names(iter_dir))
    w = {k: v for k, v in raw.items() if not k.startswith("decoder.")}
    w.update({f"decoder.final_layernorm.{p}": raw[f"decoder.final_norm.{p}"] for p in ("weight", "bias")})
    per = {}
    for k, v in raw.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", k)
        if m:
            per.setdefault(m.group(2), []).append((int(m.group(1)), v))
    for sub, items in per.items():
        assert {pattern[i] for i, _ in items} == {"*" if sub.startswith("self_attention.") else "-"}, (sub, items)
        w["decoder.layers." + sub] = torch.stack([v for _, v in sorted(items, key=lambda x: x[0])])
    return w


def test_measure_reads_the_tp2_checkpoints_and_matches_float64_reference(tp_runs, request, tmp_path):
    """``megatron-bottleneck measure`` on the TP=2 torch_dist checkpoint (its architecture, rank-16 head and
    NullTokenizer from the saved args, loaded at TP=1, without megatron.training on the path): every figure
    equals a float64 brute force from the raw saved tensors (own forward, P from an SVD of W = A B on the
    real 1001 rows of the 1024 padded ones, ranks from an SVD of G). Where Megatron-LM has pretrain_hybrid.py
    (core_v0.19), the same measure call also reads its HybridModel checkpoint (:func:`hybrid_run`: built at TP=1
    with the local hybrid spec), checked against the brute force from its raw tensors (attention layers at the
    pattern's '*', MLP layers at its '-')."""
    _ok(*tp_runs[2][:2])
    checkpoints = [(tp_runs["ckpt"], _gpt_weights)]
    if os.path.isfile(HYBRID_SCRIPT):
        hybrid = request.getfixturevalue("hybrid_run")
        _ok(hybrid["rc"], hybrid["out"])
        checkpoints.append((hybrid["ckpt"], _hybrid_weights_as_gpt))
    _assert_measure_matches_float64(checkpoints, tmp_path)


def _assert_measure_matches_float64(checkpoints, tmp_path):
    """measure (one CLI call) on the rank-16 checkpoints saved at step 6, each ``(ckpt, weights)`` against the
    float64 reference from ``weights(iter_dir)`` (the tensors under :func:`_reference_forward`'s names)."""
    import math

    import numpy as np
    import torch

    from megatron_bottleneck.measure.documents import load_documents

    gen = torch.Generator().manual_seed(3)
    raw = [torch.randint(0, 1001, (int(torch.randint(3, 45, (1,), generator=gen)),), generator=gen).tolist()
           for _ in range(5)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in raw))
    # the documents as measure reads them: shuffled with --seed 0, each cut to the saved --seq-length 32 (+1)
    docs = [d.tolist() for d in load_documents([str(data)], None, documents=0, seq_length=32, seed=0)]
    assert max(map(len, raw)) > 33 and max(map(len, docs)) == 33
    budget = 40
    rc, out, err = _measure_cli([*(str(c) for c, _ in checkpoints), "--data", str(data), "--out", str(tmp_path / "m"),
                                 "--documents", "0", "--dtype", "float64", "--rank-budget", str(budget)])
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    one = len(checkpoints) == 1  # measure.json for one model, measures.json (the list) for several
    results = json.loads((tmp_path / "m" / ("measure.json" if one else "measures.json")).read_text())
    results = [results] if one else results
    assert len(results) == len(checkpoints)
    for res, (ckpt, weights) in zip(results, checkpoints):
        assert res["kind"] == "megatron-lm" and res["vocab_size"] == 1001 and res["hidden_size"] == 64
        assert res["head_rank"] == 16 and res["seq_length"] == 32 and res["documents"] == 5

        w = weights(ckpt / "iter_0000006")
        assert w["output_layer.weight"].shape == (1024, 16)  # padded vocabulary, rank-16 factor
        head = w["output_layer.weight"][:1001] @ w["output_layer.input_proj"]  # W = A B on the real rows
        u, sv, _ = torch.linalg.svd(head, full_matrices=False)
        q = u[:, sv > sv[0] * 1e-10]  # orthonormal basis of col(W): rank 16 (a QR of the 1001 x 64 W would span 64)
        assert q.shape[1] == 16
        rows, doc_r = [], []
        with torch.no_grad():
            for d in docs:
                h = _reference_forward(w, torch.tensor(d[:-1]), heads=4)
                g = torch.softmax(h @ head.t(), -1) - torch.nn.functional.one_hot(torch.tensor(d[1:]), 1001).double()
                rows.append(g)
                doc_r.append(math.sqrt(1 - (g @ q).square().sum() / g.square().sum()))
        g = torch.cat(rows)
        vis2, g2 = (g @ q).square().sum(), g.square().sum()
        assert res["tokens"] == g.shape[0]
        assert res["destroyed_ratio"] == pytest.approx(math.sqrt(1 - vis2 / g2), rel=1e-6)
        assert res["visible_cosine"] == pytest.approx(math.sqrt(vis2 / g2), rel=1e-6)
        assert res["grad_norm"] == pytest.approx(math.sqrt(g2) / g.shape[0], rel=1e-6)
        assert res["isotropic_baseline"] == pytest.approx(math.sqrt(1 - 16 / 1000), rel=1e-12)
        assert res["per_document"]["mean"] == pytest.approx(float(np.mean(doc_r)), rel=1e-6)
        assert res["per_document"]["q50"] == pytest.approx(float(np.median(doc_r)), rel=1e-6)
        s = torch.linalg.svdvals(g[:budget])  # the rank curve's tokens: the first of the documents in measure's order
        tol = s[0] * max(budget, 1001) * torch.finfo(torch.float64).eps
        p = s / s.sum()
        assert res["rank"]["numerical_rank"] == int((s > tol).sum())
        assert res["rank"]["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)


def test_measure_refuses_an_unsupported_megatron_lm_arg_in_one_line(tp_runs, tmp_path, capsys):
    """A checkpoint whose saved args ask for what the local GPT / attention-MLP hybrid model does not build (MoE; a
    hybrid pattern with Mamba or MTP depths; a custom hybrid spec): one line naming the argument, from the saved args
    alone (in process: nothing is built or launched)."""
    import copy

    import torch

    from megatron_bottleneck.cli import main

    _ok(*tp_runs[2][:2])
    from megatron_bottleneck.measure.megatron_lm_checkpoint import read_megatron_lm_args

    saved = tp_runs["ckpt"] / "iter_0000006"
    args = read_megatron_lm_args(str(saved))
    assert args.tensor_model_parallel_size == 2 and args.lm_head_rank == 16
    cases = [({"num_experts": 8}, ["--num-experts 8", "mixture of experts"]),
             ({"hybrid_layer_pattern": "M*M-"}, ["--hybrid-layer-pattern 'M*M-'", "Mamba 'M' layers"]),
             ({"hybrid_layer_pattern": "*E*-"}, ["--hybrid-layer-pattern '*E*-'", "mixture-of-experts 'E'"]),
             ({"hybrid_layer_pattern": "*-*-/*-"}, ["--hybrid-layer-pattern '*-*-/*-'", "multi-token prediction"]),
             ({"hybrid_layer_pattern": "*-*-", "spec": ["my.specs", "stack"]}, ["--spec my.specs stack", "custom"])]
    if MEGATRON_CORE.startswith("0.16."):  # no HybridModel to build
        cases.append(({"hybrid_layer_pattern": "*-*-"}, ["--hybrid-layer-pattern '*-*-' (a HybridModel): HybridModel "
                                                         "needs megatron-core >= 0.19"]))
    for i, (edit, words) in enumerate(cases):
        fake = tmp_path / f"fake{i}"
        (fake / "iter_0000006").mkdir(parents=True)
        (fake / "latest_checkpointed_iteration.txt").write_text("6")
        (fake / "iter_0000006" / "metadata.json").write_text((saved / "metadata.json").read_text())
        edited = copy.copy(args)
        vars(edited).update(edit)
        torch.save({"args": edited}, fake / "iter_0000006" / "common.pt")  # megatron-core 0.16's layout of the args
        capsys.readouterr()
        rc = main(["measure", str(fake), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (edit, err)
        assert err[0].startswith("error: ") and all(w in err[0] for w in words), (edit, err)


# ------------------------------------------------------------------ pretrain_hybrid.py (HybridModel)
@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """pretrain_hybrid.py with the attention/MLP pattern *-*- (the 2-layer GPT of tp_runs, layer for layer) at TP=2,
    through the runner in CPU mode without --spec, with the rank-16 head and the probe; saves at step 6."""
    root = tmp_path_factory.mktemp("mlm_hybrid")
    rc, text = run(2, HEAD + ["--hybrid-layer-pattern", "*-*-", "--tensor-model-parallel-size", "2",
                              "--probe-log-dir", str(root / "probe"), "--save", str(root / "ckpt"), "--save-interval",
                              "6", "--ckpt-format", "torch_dist"], entry="pretrain_hybrid.py")
    return {"rc": rc, "out": text, "probe": root / "probe", "ckpt": root / "ckpt"}


@needs_hybrid_script
def test_pretrain_hybrid_with_the_local_spec_trains_as_pretrain_gpt(hybrid_run, tp_runs):
    """Megatron-LM's unchanged pretrain_hybrid.py through the runner on CPU: the local hybrid spec picked and said in
    one line (recorded as --spec in the saved args), the head installed once, and the *-*- HybridModel at TP=2 gives
    pretrain_gpt.py's TP=1 losses and probe figures (the same weights under other names)."""
    from megatron_bottleneck.integrations.megatron_lm import LOCAL_HYBRID_SPEC
    from megatron_bottleneck.measure.megatron_lm_checkpoint import read_megatron_lm_args

    out = hybrid_run["out"]
    _ok(hybrid_run["rc"], out)
    assert out.count("megatron-bottleneck: CPU mode, no --spec: HybridModel is built with megatron-bottleneck's "
                     "local hybrid stack spec (--spec megatron_bottleneck.models.hybrid LOCAL_HYBRID_STACK_SPEC") == 1
    assert out.count("installed a rank-16 low-rank LM head") == 1
    one, hy = losses(tp_runs[1][1]), losses(out)
    assert sorted(hy) == sorted(one) == list(range(1, 7))
    for it in one:
        assert hy[it] == pytest.approx(one[it], rel=1e-5), (it, one, hy)
    r1, rh = records(tp_runs[1][2]), records(hybrid_run["probe"])
    assert [r["step"] for r in rh] == list(range(6))
    for a, b in zip(r1, rh):
        assert b["probe/destroyed_ratio"] == pytest.approx(a["probe/destroyed_ratio"], rel=1e-5)
        assert b["probe/isotropic_baseline"] == pytest.approx(a["probe/isotropic_baseline"], rel=1e-12)
    saved = read_megatron_lm_args(str(hybrid_run["ckpt"] / "iter_0000006"))
    assert saved.hybrid_layer_pattern == "*-*-" and tuple(saved.spec) == LOCAL_HYBRID_SPEC
    assert saved.tensor_model_parallel_size == 2 and saved.num_layers == 4
