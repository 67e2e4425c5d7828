"""``measure`` across processes: two data-parallel ranks give one process's figures, and a trainer checkpoint
measured by ``measure`` gives the probe's destroyed ratio for the same batch."""
import dataclasses
import json

import pytest

import megatron_bottleneck as mb
from megatron_bottleneck.cli import main
from megatron_bottleneck.measure import MeasureConfig, measure_model
from megatron_bottleneck.measure.run import _measure_rank
from tests.distributed import measure_ranks

KEYS = ("destroyed_ratio", "visible_cosine", "isotropic_baseline", "grad_norm", "hidden_grad_norm", "loss")


def test_two_data_parallel_ranks_give_one_process_figures(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64))
    model.save_pretrained(str(tmp_path / "m"))
    data = tmp_path / "docs.jsonl"
    gen = torch.Generator().manual_seed(2)
    data.write_text("".join(json.dumps({"tokens": torch.randint(0, 80, (int(n),), generator=gen).tolist()}) + "\n"
                            for n in torch.randint(2, 30, (11,), generator=gen)))
    cfg = MeasureConfig(models=[str(tmp_path / "m")], data=[str(data)], out=str(tmp_path / "one"), documents=0,
                        seq_length=20, rank_budget=24, batch_size=2, dtype="float64", progress=False)
    one = measure_model(cfg)[0]
    two = mb.launch(_measure_rank, 2, dataclasses.asdict(cfg), 0, timeout=600)
    assert two[1] is None and two[0]["data_parallel_size"] == 2
    two = two[0]
    assert two["tokens"] == one["tokens"] and two["documents"] == one["documents"]
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert two["per_document"] == pytest.approx(one["per_document"], rel=1e-6)
    assert two["rank"] == pytest.approx(one["rank"], rel=1e-6)
    assert len(two["rank_curve"]) == len(one["rank_curve"]) == 5
    for a, b in zip(two["rank_curve"], one["rank_curve"]):
        assert a == pytest.approx(b, rel=1e-9)


def test_a_trainer_checkpoint_gives_the_probe_record_of_the_same_batch(tmp_path, spamlang):
    out = mb.launch(measure_ranks.train_and_probe, 1, str(tmp_path), spamlang, timeout=600)[0]
    data = tmp_path / "batch.jsonl"
    data.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in out["docs"]))
    assert main(["measure", out["checkpoint"], "--data", str(data), "--out", str(tmp_path / "m"), "--documents", "0",
                 "--rank-budget", "32", "--no-progress"]) == 0
    res = json.load(open(tmp_path / "m" / "measure.json"))
    rec = out["record"]
    assert res["kind"] == "trainer" and res["tokens"] == 16 * 8 and res["head_rank"] == 4
    assert res["destroyed_ratio"] == pytest.approx(rec["destroyed_ratio"], rel=1e-5)
    assert res["visible_cosine"] == pytest.approx(rec["visible_cosine"], rel=1e-5)
    assert res["isotropic_baseline"] == pytest.approx(rec["isotropic_baseline"], rel=1e-9)
