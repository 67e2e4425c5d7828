"""``megatron-bottleneck measure`` on tiny random HuggingFace models of several families, saved with
``save_pretrained`` and measured from their folder through the command line: every figure against an
independent float64 computation from the model's full logits (QR of the head weight for the projection,
SVD of G for the ranks); bad input gives one line."""
import json
import math
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="measure's HuggingFace path needs transformers ([hf])")

from megatron_bottleneck.cli import main  # noqa: E402
from megatron_bottleneck.measure import load_documents  # noqa: E402

V, D = 97, 16


def _families():
    t = transformers
    out = {"gpt2-tied": lambda: t.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=64,
                                             tie_word_embeddings=True),
           "gpt-neox": lambda: t.GPTNeoXConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=64, tie_word_embeddings=False),
           "llama": lambda: t.LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)}
    if hasattr(t, "Qwen3Config"):
        out["qwen3-tied"] = lambda: t.Qwen3Config(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                  intermediate_size=32, max_position_embeddings=64,
                                                  tie_word_embeddings=True)
    if hasattr(t, "Olmo2Config"):
        out["olmo2"] = lambda: t.Olmo2Config(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=64)
    # a scalar logit multiplier folded into W: Cohere multiplies by logit_scale, Granite divides by logits_scaling
    if hasattr(t, "CohereConfig"):
        out["cohere-scaled"] = lambda: t.CohereConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1,
                                                      intermediate_size=32, max_position_embeddings=64,
                                                      logit_scale=0.25)
    if hasattr(t, "GraniteConfig"):
        out["granite-scaled"] = lambda: t.GraniteConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1,
                                                        intermediate_size=32, max_position_embeddings=64,
                                                        logits_scaling=4.0)
    return out


FAMILIES = _families()


def save_tiny(name: str, path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]())
    with torch.no_grad():  # a random head with some structure: not the near-isotropic init only
        model.get_output_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def token_docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    gen = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for _ in range(14):
            n = int(torch.randint(2, 40, (1,), generator=gen))
            f.write(json.dumps({"tokens": torch.randint(0, V, (n,), generator=gen).tolist()}) + "\n")
    return str(path)


def reference(folder: str, docs, budget: int):
    """Independent float64 figures: the model's own full logits, P from a QR of W, ranks from an SVD of G."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).double().eval()
    w = model.get_output_embeddings().weight.detach().double()
    q, _ = torch.linalg.qr(w)  # V x D orthonormal basis of col(W)
    rows, doc_r = [], []
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor(d[:-1])[None]
            logits = model(input_ids=ids).logits[0].double()
            g = torch.softmax(logits, -1) - torch.nn.functional.one_hot(torch.tensor(d[1:]), V).double()
            rows.append(g)
            vis = (g @ q).square().sum()
            doc_r.append(math.sqrt(1 - vis / g.square().sum()))
    g = torch.cat(rows)
    n = g.shape[0]
    vis2, g2 = (g @ q).square().sum(), g.square().sum()
    out = {"destroyed_ratio": math.sqrt(1 - vis2 / g2), "visible_cosine": math.sqrt(vis2 / g2),
           "grad_norm": math.sqrt(g2) / n, "tokens": n, "doc_r": np.array(doc_r),
           "isotropic_baseline": math.sqrt(1 - D / (V - 1))}
    s = torch.linalg.svdvals(g[:budget])
    tol = s[0] * max(budget, V) * torch.finfo(torch.float64).eps
    p = s / s.sum()
    cum = (s ** 2).cumsum(0) / (s ** 2).sum()
    out["rank"] = {"numerical_rank": int((s > tol).sum()), "effective_rank": float(torch.exp(-(p * p.log()).sum())),
                   "components_for_90pct": int((cum < 0.9 - 1e-12).sum()) + 1}
    out["curve"] = {}
    for t in sorted({min(2 ** i, budget) for i in range(1, 8)}):
        if t <= budget:
            st = torch.linalg.svdvals(g[:t])
            out["curve"][t] = int((st > st[0] * max(t, V) * torch.finfo(torch.float64).eps).sum())
    return out


def _measure(folder, data, out, *extra):
    assert main(["measure", folder, "--data", *data, "--out", str(out), "--no-progress", *extra]) == 0
    return json.load(open(out / "measure.json"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_figure_equals_an_independent_float64_computation(family, tmp_path, token_docs):
    folder = save_tiny(family, tmp_path / family)
    budget, seq = 48, 24
    res = _measure(folder, [token_docs], tmp_path / "out", "--dtype", "float64", "--seq-length", str(seq),
                   "--rank-budget", str(budget), "--batch-size", "3", "--documents", "12", "--seed", "5")
    docs = [d.tolist() for d in load_documents([token_docs], None, documents=12, seq_length=seq, seed=5)]
    ref = reference(folder, docs, budget)
    assert res["tokens"] == ref["tokens"] and res["documents"] == 12 and res["vocab_size"] == V
    assert res["hidden_size"] == D and res["head_rank"] == D
    for key in ("destroyed_ratio", "visible_cosine", "grad_norm", "isotropic_baseline"):
        assert res[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    per_doc = res["per_document"]
    assert per_doc["mean"] == pytest.approx(ref["doc_r"].mean(), rel=1e-6)
    assert per_doc["q50"] == pytest.approx(float(np.quantile(ref["doc_r"], 0.5)), rel=1e-6)
    assert per_doc["q05"] == pytest.approx(float(np.quantile(ref["doc_r"], 0.05)), rel=1e-6)
    assert res["rank"]["numerical_rank"] == ref["rank"]["numerical_rank"]
    assert res["rank"]["effective_rank"] == pytest.approx(ref["rank"]["effective_rank"], rel=1e-6)
    assert res["rank"]["components_for_90pct"] == ref["rank"]["components_for_90pct"]
    assert {p["tokens"]: p["numerical_rank"] for p in res["rank_curve"]} == ref["curve"]
    assert "components_for_99.9pct" in res["rank_curve"][-1] and "rank_tolerance" in res["rank_curve"][-1]
    md = (tmp_path / "out" / "measure.md").read_text()
    assert f"| {res['destroyed_ratio']:.4f} |" in md


def test_float32_default_and_token_chunks_match_the_reference(tmp_path, token_docs):
    """fp32 backbone, the head's logits in chunks of a few tokens (a tiny memory budget)."""
    from megatron_bottleneck.measure import MeasureConfig, measure_model

    folder = save_tiny("llama", tmp_path / "m")
    cfg = MeasureConfig(models=[folder], data=[token_docs], out=str(tmp_path / "out"), documents=0, seq_length=24,
                        rank_budget=16, batch_size=4, dtype="float32", memory_budget_bytes=2 * 4 * V * 5,
                        progress=False)
    res = measure_model(cfg)[0]
    docs = [d.tolist() for d in load_documents([token_docs], None, documents=0, seq_length=24)]
    ref = reference(folder, docs, 16)
    assert res["documents"] == 14
    for key in ("destroyed_ratio", "visible_cosine", "grad_norm"):
        assert res[key] == pytest.approx(ref[key], rel=2e-5), key


def test_several_models_give_one_table_and_plots(tmp_path, token_docs):
    a = save_tiny("gpt2-tied", tmp_path / "a")
    b = save_tiny("llama", tmp_path / "b", seed=1)
    cfg = tmp_path / "models.yaml"
    cfg.write_text(f"- model: {b}\n  label: tiny-llama\n  paper: '0.95-0.99'\n")
    assert main(["measure", a, "--config", str(cfg), "--data", token_docs, "--out", str(tmp_path / "out"),
                 "--seq-length", "16", "--rank-budget", "8", "--no-progress"]) == 0
    table = (tmp_path / "out" / "measure.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and "destroyed" not in line]) == 2
    assert "tiny-llama" in table[3] and "0.95-0.99" in table[3]
    both = json.load(open(tmp_path / "out" / "measures.json"))
    assert [r["model"] for r in both] == [a, b]
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "out" / "destroyed_ratio.png").stat().st_size > 1000
        assert (tmp_path / "out" / "rank_curves.png").stat().st_size > 1000


def _one_line(args, capsys):
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_text_data_through_the_model_tokenizer_and_empty_data(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = save_tiny("gpt2-tied", tmp_path / "m")
    words = {f"w{i}": i for i in range(V - 1)}
    words["[UNK]"] = V - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    text = tmp_path / "docs.txt"
    text.write_text("w1 w2 w3 w4 w5\nw6 w7\n\nw8 w9 w10 w11\n\nw12\n")
    res = _measure(folder, [str(text)], tmp_path / "out", "--rank-budget", "4")
    assert res["documents"] == 2 and res["tokens"] == 6 + 3  # "w12" alone predicts nothing
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    line = _one_line(["measure", folder, "--data", str(empty), "--out", str(tmp_path / "o2")], capsys)
    assert line.startswith("error: --data ") and "tokenises to nothing" in line


def test_bad_inputs_are_one_line(tmp_path, token_docs, capsys, monkeypatch):
    folder = save_tiny("gpt2-tied", tmp_path / "m")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"tokens": [3]}) + "\n")
    line = _one_line(["measure", folder, "--data", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert "tokenises to nothing" in line
    line = _one_line(["measure", str(tmp_path / "no-such-model"), "--data", token_docs, "--out", str(tmp_path / "o")],
                     capsys)
    assert "cannot load" in line and "no-such-model" in line
    text = tmp_path / "docs.txt"
    text.write_text("some text\n")
    line = _one_line(["measure", folder, "--data", str(text), "--out", str(tmp_path / "o")], capsys)
    assert "--data is text" in line and "tokenizer does not load" in line
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "get_output_embeddings",
                        lambda self: torch.nn.Sequential(self.lm_head))
    line = _one_line(["measure", folder, "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert line.startswith("error: head of ") and "not a linear layer" in line


def test_soft_capped_logits_and_megatron_lm_checkpoints_are_one_line(tmp_path, token_docs, capsys):
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma2Config")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        intermediate_size=32, max_position_embeddings=64, final_logit_softcapping=30.0)).save_pretrained(
        str(tmp_path / "gemma2"))
    line = _one_line(["measure", str(tmp_path / "gemma2"), "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert "soft-capped" in line and "final_logit_softcapping=30.0" in line
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    (mlm / "latest_checkpointed_iteration.txt").write_text("100\n")
    line = _one_line(["measure", str(mlm), "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert "iter_0000100: no metadata.json: not a torch_dist checkpoint directory" in line
    (mlm / "iter_0000100" / "mp_rank_00").mkdir(parents=True)  # Megatron-LM's legacy --ckpt-format torch
    line = _one_line(["measure", str(mlm), "--data", token_docs, "--out", str(tmp_path / "o")], capsys)
    assert "legacy --ckpt-format torch checkpoint" in line and "torch_dist" in line


def test_missing_transformers_is_one_line(tmp_path, token_docs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # transformers not installed
    assert main(["measure", "gpt2", "--data", token_docs, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: measuring a HuggingFace model needs transformers: pip install 'megatron-bottleneck[hf]'"]


def test_megatron_lm_tokenizers_give_the_tokenizers_own_ids_eod_and_size(tmp_path, capsys):
    """The tokenizer a Megatron-LM checkpoint names (its saved args), read back as measure reads it: ids, EOD and
    V from the tokenizer itself; one that does not load here falls back to --vocab-size with a warning."""
    import argparse

    import sentencepiece

    from megatron_bottleneck.data import train_tokenizer
    from megatron_bottleneck.measure.megatron_lm_checkpoint import megatron_lm_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"the gradient {w} of the head {w} is low rank" for w in
                                  ("alpha", "beta", "gamma", "delta", "theta", "kappa") * 20))
    model = train_tokenizer([str(corpus)], vocab_size=60, model_prefix=str(tmp_path / "sp"))
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    text = "the head of gamma is low rank"
    for kind, bos in (("GPTSentencePieceTokenizer", []), ("Llama2Tokenizer", [sp.bos_id()])):
        args = argparse.Namespace(tokenizer_type=kind, tokenizer_model=model, padded_vocab_size=128, vocab_size=None)
        tokenize, eod, v = megatron_lm_tokenizer(args, "ckpt")
        assert tokenize(text) == bos + sp.encode_as_ids(text) and eod == sp.eos_id() and v == sp.vocab_size() == 60

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "\u0120": 4, "\u0120ab": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n\u0120 ab\n")
    args = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                              merge_file=str(tmp_path / "merges.txt"), padded_vocab_size=128, vocab_size=None)
    tokenize, eod, v = megatron_lm_tokenizer(args, "ckpt")
    assert tokenize("ab ab") == [3, 5] and eod == 0 and v == 6

    args = argparse.Namespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tmp_path / "gone.model"),
                              padded_vocab_size=128, vocab_size=100)
    capsys.readouterr()
    tokenize, eod, v = megatron_lm_tokenizer(args, "ckpt")
    assert (eod, v) == (None, 100)
    assert "does not load here" in capsys.readouterr().err
    with pytest.raises(Exception):
        tokenize(text)
