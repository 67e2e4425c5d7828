"""``megatron-bottleneck eval``: a tiny low-rank-head checkpoint trained at TP=2 on real text (SentencePiece),
scored at TP=1 through lm-evaluation-harness on tasks defined from local files (no hub, no network)."""
import json
import logging
import math
import os
import shutil
import sys

import pytest
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sentencepiece")
pytest.importorskip("lm_eval")

import torch  # noqa: E402

from megatron_bottleneck.cli import main  # noqa: E402

from ..unit.test_text_data import WORDS, corpus  # noqa: E402

SEQ = 16
HEAD_RANK = 4


def _tasks(root, docs):
    """A multiple-choice task and a rolling-log-likelihood (perplexity) task, each from a local JSON file."""
    inc = root / "tasks"
    inc.mkdir()
    mc = [{"query": " ".join(d.split()[:4]), "choices": [" " + " ".join(d.split()[4:8]), " zebra quantum xylophone",
                                                         " " + " ".join(reversed(d.split()[4:8]))], "label": 0}
          for d in docs[:6]]
    (root / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in mc) + "\n")
    (root / "ppl.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[6:10]) + "\n")
    (inc / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    (inc / "tiny_ppl.yaml").write_text(yaml.safe_dump({
        "task": "tiny_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(root / "ppl.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}]}))
    (inc / "tiny_gen.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{query}}", "doc_to_target": "x",
        "generation_kwargs": {"until": ["."]}, "metric_list": [{"metric": "exact_match"}]}))
    return inc, mc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_bottleneck.data import tokenize_to_indexed, train_tokenizer
    from megatron_bottleneck.train import TrainConfig, run

    root = tmp_path_factory.mktemp("eval")
    docs = corpus(root / "docs.txt", docs=300)
    model = train_tokenizer([str(root / "docs.txt")], 120, str(root / "tok" / "sp"))
    tokenize_to_indexed([str(root / "docs.txt")], model, str(root / "text"))
    run_dir = root / "run"
    cfg = TrainConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "seq_length": SEQ,
                  "vocab_size": 128, "head_rank": HEAD_RANK},
        "parallel": {"tensor_model_parallel_size": 2},
        "train": {"train_steps": 12, "global_batch_size": 16, "micro_batch_size": 16, "eval_interval": 0,
                  "log_interval": 10},
        "optim": {"lr": 0.05, "warmup_steps": 2},
        "data": {"train_prefix": str(root / "text")},
        "checkpoint": {"dir": str(run_dir / "ckpt"), "async_save": False},
        "logging": {"dir": str(run_dir / "logs"), "tensorboard": False, "console": False}})
    run(cfg)
    inc, mc = _tasks(root, docs)
    return {"root": root, "run": run_dir, "ckpt": run_dir / "ckpt", "sp": model, "inc": inc, "mc": mc, "docs": docs}


def test_eval_writes_lm_eval_results_and_report_draws_them(trained, capsys):
    from megatron_bottleneck.report import write_report
    from megatron_bottleneck.base.sinks import read_jsonl

    assert main(["eval", str(trained["ckpt"]), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(trained["inc"]),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    path = trained["run"] / "eval" / "results.json"  # the default: the run directory's eval/
    assert str(path) in capsys.readouterr().out
    res = json.loads(path.read_text())
    mc, ppl = res["results"]["tiny_mc"], res["results"]["tiny_ppl"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert res["megatron_bottleneck"]["head_rank"] == HEAD_RANK
    assert res["n-samples"]["tiny_mc"]["effective"] == 6
    # The resharded (TP=2 -> TP=1) weights are the trained ones: the rolling loss per token on in-distribution
    # text is near the trainer's final training loss and far below an untrained model's ln V.
    final = read_jsonl(str(trained["run"] / "logs" / "metrics.jsonl"))[-1]["loss"]
    assert final < math.log(128) - 1
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=trained["sp"])
    texts = trained["docs"][6:10]
    tokens = sum(len(sp.encode(t)) for t in texts)
    words = sum(len(t.split()) for t in texts)
    per_token = math.log(ppl["word_perplexity,none"]) * words / tokens
    assert abs(per_token - final) < 0.5, (per_token, final)

    # report: a zero-shot section from the run's eval results; a second run (another head rank) makes a curve
    other = trained["root"] / "runs" / "dense"
    runs = trained["root"] / "runs"
    shutil.copytree(trained["run"], runs / "r4", ignore=shutil.ignore_patterns("ckpt"))
    shutil.copytree(trained["run"], other, ignore=shutil.ignore_patterns("ckpt"))
    conf = yaml.safe_load((other / "logs" / "config.yaml").read_text())
    conf["model"]["head_rank"] = None
    (other / "logs" / "config.yaml").write_text(yaml.safe_dump(conf))
    res["results"]["tiny_mc"]["acc_norm,none"] = 0.75
    (other / "eval" / "results.json").write_text(json.dumps(res))
    report = open(write_report(str(runs))).read()
    section = report[report.index("## Zero-shot score vs head rank"):]
    assert "| 4 |" in section and "| 16 (dense) |" in section and "0.750" in section and "tiny_mc" in section
    assert (runs / "zero_shot_vs_rank.png").stat().st_size > 1000


def test_loglikelihoods_equal_the_models_own_loss(trained):
    """Our lm-eval model's log-likelihoods (batched, padded, left-truncated) equal minus the model's own
    cross-entropy (its forward with labels) summed over the continuation tokens, to 1e-5."""
    from lm_eval.api.instance import Instance

    from megatron_bottleneck.evaluate import checkpoint_tokenizer, harness_model, open_checkpoint

    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=trained["sp"])
    docs = trained["docs"]
    pairs = [(d["query"], c) for d in trained["mc"] for c in d["choices"]]
    pairs += [("", docs[20]), (docs[21] + " " + docs[22] + " " + docs[23], " " + docs[24])]  # no context; > L tokens
    with open_checkpoint(str(trained["ckpt"]), device="cpu", batch_size=3) as (scorer, cfg):
        tok = checkpoint_tokenizer(cfg)
        scorer.eod = tok.eod
        lm = harness_model(scorer, tok)
        got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
        rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (docs[30] + " " + docs[31],), 0)])
        model = scorer.model

        def own_loss(seq, n):
            """- sum of the model's per-token loss over the last n tokens of seq (one unpadded sequence)."""
            t = torch.tensor([seq[:-1]])
            labels = torch.tensor([seq[1:]])
            with torch.no_grad():
                loss = model(t, torch.arange(t.shape[1])[None], None, labels=labels)  # [1, s] per-token CE
            return -float(loss[0, -n:].double().sum())

        for (ctx, cont), (lp, greedy) in zip(pairs, got):
            c = sp.encode(ctx) if ctx else [sp.eos_id()]
            whole = sp.encode(ctx + cont) if ctx else c + sp.encode(cont)
            x = whole[len(c):] if ctx else sp.encode(cont)
            seq = (c + x)[-(SEQ + 1):]
            assert lp == pytest.approx(own_loss(seq, min(len(x), len(seq) - 1)), abs=1e-5)
            assert isinstance(greedy, bool)
        assert len(sp.encode(pairs[-1][0])) > SEQ  # the truncated case is there
        ids = sp.encode(docs[30] + " " + docs[31])
        assert len(ids) > SEQ
        ref, prev = 0.0, [sp.eos_id()] + ids  # disjoint windows: tokens 0..L-1 after EOD, then L at a time
        for start in range(0, len(ids), SEQ):
            n = min(SEQ, len(ids) - start)
            seq = prev[max(0, start + n - SEQ): start + n + 1]
            ref += own_loss(seq, n)
        assert rolling[0] == pytest.approx(ref, abs=1e-5)


def test_bad_inputs_are_one_line(trained, tmp_path, capsys, monkeypatch, spamlang):
    from megatron_bottleneck.base.errors import DataError
    from megatron_bottleneck.evaluate import checkpoint_tokenizer, resolve_checkpoint
    from megatron_bottleneck.train import TrainConfig

    # logging handlers made during an earlier test keep that test's (closed) stderr capture: point them here
    handlers = [h for name in ("", "lm_eval") for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler]

    def one_line(args, needle):
        """Exit status 2, one error line and no traceback (lm-eval's and datasets' own log lines aside)."""
        for h in handlers:
            h.stream = sys.stderr  # (setStream would flush the closed one)
        try:
            assert main(["eval", *args]) == 2
        finally:
            for h in handlers:
                h.stream = sys.__stderr__
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err

    one_line([str(tmp_path / "nothing")], "no checkpoint at")
    one_line([str(trained["ckpt"]), "--tasks", "no_such_task", "--include-path", str(trained["inc"])],
             "unknown lm-eval task(s) ['no_such_task']")
    one_line([str(trained["ckpt"]), "--tokenizer", str(tmp_path / "missing.model"), "--tasks", "tiny_mc",
              "--include-path", str(trained["inc"])], "tokenizer model")
    one_line([str(trained["ckpt"]), "--tasks", "tiny_gen", "--include-path", str(trained["inc"]), "--device", "cpu"],
             "task tiny_gen is generative (generate_until)")
    other = tmp_path / "other_model"  # the weights of a rank-4 head under a config that asks for rank 8
    shutil.copytree(resolve_checkpoint(str(trained["ckpt"])), other)
    conf = yaml.safe_load((other / "config.yaml").read_text())
    conf["model"]["head_rank"] = 8
    (other / "config.yaml").write_text(yaml.safe_dump(conf))
    one_line([str(other), "--tasks", "tiny_mc", "--include-path", str(trained["inc"]), "--device", "cpu"],
             "the model does not load from it")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    one_line([str(trained["ckpt"])], "pip install 'megatron-bottleneck[eval]'")
    monkeypatch.undo()
    cfg = TrainConfig.load(os.path.join(resolve_checkpoint(str(trained["ckpt"])), "config.yaml"))
    cfg.data.train_prefix = spamlang["train_prefix"]
    with pytest.raises(DataError, match="SpamLang .* no text tokenizer"):
        checkpoint_tokenizer(cfg)
