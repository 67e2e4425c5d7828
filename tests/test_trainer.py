"""The trainer: exact resume after SIGTERM (TP=2 x DP=2, distributed optimizer), atomic checkpoints, config errors."""
import functools
import os

import pytest
import yaml

import megatron_bottleneck as mb
import trainer_runs as tr
from megatron_bottleneck.data import SpamLangConfig, generate_spamlang
from megatron_bottleneck.errors import ConfigError
from megatron_bottleneck.train import TrainConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train"))
    data = generate_spamlang(SpamLangConfig(64, 8, 800, seed=3), os.path.join(tmp, "data", "spam"))
    first = mb.launch(functools.partial(tr.uninterrupted_then_killed, tmp, data), 4, timeout=600)[-1]
    ckpt = os.path.join(tmp, "ckpt")
    listing = sorted(os.listdir(ckpt))
    os.makedirs(os.path.join(ckpt, "iter_0000099.tmp"))  # a save killed mid-way: must be ignored
    second = mb.launch(functools.partial(tr.resume, tmp, data), 4, timeout=600)[-1]
    other = mb.launch(functools.partial(tr.two_rank_checks, tmp, data), 2, timeout=600)
    return {"first": first, "second": second, "listing": listing, "tmp": tmp, "final": sorted(os.listdir(ckpt)),
            "two_rank": other}


def test_sigterm_saves_and_resume_is_exact(runs):
    first, second = runs["first"], runs["second"]
    assert first["stopped"] is not None and first["iteration"] == 7
    assert first["part"] == first["full"][:7]
    assert second["steps"] == list(range(8, 13))
    assert second["losses"] == first["full"][7:]  # bitwise: same data position, optimizer, RNG


def test_distributed_optimizer_shards_state_and_matches_regular_adam(runs):
    first = runs["first"]
    sharded, replicated = first["numel"]
    assert replicated > 0 and sharded < 0.75 * replicated  # DP=2: about half of the Adam state per rank
    assert first["full"] == pytest.approx(first["plain"], rel=1e-5, abs=1e-6)


def test_resume_with_another_layout_is_refused_clearly(runs):
    for rank in runs["two_rank"]:  # every rank stops with the same message
        message = rank["message"]
        assert message is not None and "another parallel layout" in message
        assert "data_parallel_size: saved 2, now 1" in message and "world_size: saved 4, now 2" in message


def test_resume_is_exact_with_the_replicated_optimizer_too(runs):
    last = runs["two_rank"][-1]
    assert len(last["full"]) == 6 and last["resumed"] == last["full"][3:]


def test_checkpoints_are_atomic_and_pruned(runs):
    assert runs["listing"] == ["iter_0000005", "iter_0000007", "latest"]
    assert "iter_0000099.tmp" not in runs["final"]  # the next save cleaned it
    assert runs["final"] == ["iter_0000010", "iter_0000012", "latest"]
    with open(os.path.join(runs["tmp"], "ckpt", "latest")) as f:
        assert f.read() == "iter_0000012"


def test_training_learns_under_tp2_and_logs(runs):
    full = runs["first"]["full"]
    assert full[-1] < full[0] - 0.2
    rows = mb.probe.read_jsonl(os.path.join(runs["tmp"], "a", "logs", "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[3]["valid_loss"] is not None and rows[-1]["tokens"] == 12 * 16 * 8
    probe_rows = mb.probe.read_jsonl(os.path.join(runs["tmp"], "a", "logs", "probe.jsonl"))
    assert len(probe_rows) == 6 and all(0 < r["probe/destroyed_ratio"] < 1 for r in probe_rows)


def test_config_typo_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        TrainConfig.from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        TrainConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be int, got 'eight'"):
        TrainConfig.from_dict({"train": {"micro_batch_size": "eight"}})
    with pytest.raises(ConfigError, match=r"model.head_rank must be in \[1, model.hidden_size=32\]"):
        TrainConfig.from_dict({"model": {"head_rank": 64}})
    with pytest.raises(ConfigError, match=r"unknown key 'probe.intervall'"):
        TrainConfig.from_dict({"probe": {"intervall": 3}})


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"hidden_size": 64, "num_attention_heads": 4},
                                    "optim": {"lr": 0.001}}))
    cfg = TrainConfig.load(str(path), ["optim.lr=3e-4", "--model.head_rank=16", "probe.interval=5"])
    assert cfg.model.hidden_size == 64 and cfg.optim.lr == 3e-4 and cfg.model.head_rank == 16
    assert cfg.probe == {"interval": 5}
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        TrainConfig.load(str(path), ["lr=1"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        TrainConfig.load(str(tmp_path / "missing.yaml"))
