"""Asynchronous checkpoint saves stay atomic: until the save is finalised (every rank's background write done)
the previous checkpoint is ``latest`` and intact, the new one only a ``.tmp`` folder; then it is renamed, made
``latest`` and old ones pruned. One gloo rank in this process, Megatron's forked writer."""
import os

import pytest
import torch

from megatron_bottleneck.train.checkpoint import CheckpointWriter, latest_checkpoint, load_model_only, save_checkpoint
from tests import support

pytestmark = pytest.mark.usefixtures("megatron_one_rank")


def test_an_unfinished_async_save_leaves_the_previous_checkpoint(tmp_path):
    _, chunks = support.build_chunks(1, 1, None, False, 8)
    d = str(tmp_path / "ckpt")
    writer = CheckpointWriter(async_save=True)
    save_checkpoint(d, 1, chunks, {"step": 1}, keep_last=1, writer=writer)
    writer.close()
    assert sorted(os.listdir(d)) == ["iter_0000001", "latest"]
    weights = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
    save_checkpoint(d, 2, chunks, {"step": 2}, keep_last=1, writer=writer)
    assert writer.pending == 1
    # What a crash now leaves: the previous checkpoint as latest, complete; the new one under .tmp only.
    assert latest_checkpoint(d) == os.path.join(d, "iter_0000001")
    assert sorted(os.listdir(d)) == ["iter_0000001", "iter_0000002.tmp", "latest"]
    _, fresh = support.build_chunks(1, 1, None, False, 8)
    load_model_only(os.path.join(d, "iter_0000001"), fresh)
    for k, v in fresh[0].state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    writer.close()  # blocking: waits for the write, then publishes
    assert writer.pending == 0
    assert sorted(os.listdir(d)) == ["iter_0000002", "latest"]  # renamed, made latest, iter_1 pruned
    load_model_only(latest_checkpoint(d), fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh[0].parameters(), chunks[0].parameters()))
    assert torch.load(os.path.join(d, "iter_0000002", "rank_0.pt")) == {"step": 2}
