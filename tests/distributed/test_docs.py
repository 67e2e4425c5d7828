"""Every code block of README.md and docs/*.md runs as a user would run it (a fresh process in a scratch
directory).

A block is preceded by an optional marker line ``<!-- readme-test: KIND[: detail] -->``:
  (none)        python: run as a script; bash: run with ``bash -e`` (the installed ``megatron-bottleneck``);
  setup: NAME   the same, after ``SETUP[NAME]`` wrote the input files the block names (a corpus, ...);
  bridge        the Megatron-Bridge example (marked ``<!-- bridge-example -->``): tests/bridge runs it with the real
                Bridge (the CI lane "bridge"), reading it from here;
  diff: WHERE   a patch applied by the test named in WHERE, which reads it from here;
  skip: REASON  bash that needs a cluster or GPUs (the reason is required, and says what tests it instead).
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import subprocess
import sys

import pytest

from ..lanes import NOT_README_LANE, README_LANE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = re.compile(r"<!-- readme-test: (\w+)(?::\s*(.*?))? -->")


DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))


def readme_blocks(page="README.md"):
    """[(where, language, kind, detail, code)] for every fenced block of one page (where: ``page:line``)."""
    lines = open(os.path.join(REPO, page), encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mark = MARKER.match(prev.strip())
        kind, detail = (mark.group(1), mark.group(2) or "") if mark else ("run", "")
        if prev.strip() == "<!-- bridge-example -->":
            kind, detail = "bridge", "tests/bridge/test_bridge_pretrain.py"
        if prev.strip() == "<!-- test-command -->":  # .ci/run reads the line after that marker's fence
            kind, detail = "skip", "the test command itself (.ci/run runs it in both lanes)"
        out.append((f"{page}:{start + 1}", lang, kind, detail, "\n".join(lines[start + 1:j]) + "\n"))
        i = j + 1
    return out


def _corpus(cwd):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    with open(os.path.join(cwd, "corpus.txt"), "w") as f:
        f.write("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(400)))
    with open(os.path.join(cwd, "more.jsonl"), "w") as f:
        for _ in range(50):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")


SETUP = {"corpus": _corpus}
BLOCKS = [b for page in DOCS for b in readme_blocks(page)]


def test_every_block_is_run_or_says_why_not():
    kinds = {k for _, _, k, _, _ in BLOCKS}
    assert kinds <= {"run", "setup", "bridge", "diff", "skip"}, kinds
    for line, lang, kind, detail, _ in BLOCKS:
        assert lang in ("python", "bash", "diff"), f"{line}: a ```{lang} block"
        if kind == "skip":
            assert lang == "bash" and len(detail) > 20, f"{line}: skip only bash, with its reason"
        if lang == "diff":
            assert kind == "diff" and "::" in detail, f"{line}: a diff names the test that applies it"
        if kind == "setup":
            assert detail in SETUP, f"{line}: unknown setup {detail!r}"
        if kind == "bridge":
            with open(os.path.join(REPO, detail), encoding="utf-8") as f:
                assert "bridge-example" in f.read(), f"{line}: {detail} does not read the block"
    assert sum(k in ("run", "setup") for _, _, k, _, _ in BLOCKS) >= 8


@pytest.mark.parametrize("line, lang, kind, detail, code",
                         [b for b in BLOCKS if b[2] in ("run", "setup")],
                         ids=[b[0] for b in BLOCKS if b[2] in ("run", "setup")])
def test_readme_block_runs(line, lang, kind, detail, code, tmp_path):
    if not README_LANE:
        pytest.skip(NOT_README_LANE)
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    if kind == "setup":
        SETUP[detail](str(tmp_path))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("MB_CPU", None)
    if lang == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-c", code]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{line} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
