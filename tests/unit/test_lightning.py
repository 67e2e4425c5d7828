"""The probe as a Lightning Callback, with the real ``lightning`` package (CPU, one process)."""
import os

import pytest
import torch

lightning = pytest.importorskip("lightning")

from megatron_bottleneck import read_jsonl  # noqa: E402
from megatron_bottleneck.integrations.lightning import ProbeCallback  # noqa: E402
from megatron_bottleneck.probe import ProbeConfig  # noqa: E402

V, D, T = 300, 12, 64


class TinyLM(lightning.LightningModule):
    """Embedding -> MLP -> dense head (logits linear in the head weight)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.GELU(), torch.nn.Linear(2 * D, D))
        self.head = torch.nn.Linear(D, V, bias=False)
        self.captured = []

    def training_step(self, batch, _idx):
        x, y = batch
        logits = self.head(self.mlp(self.embed(x)))
        logits.retain_grad()
        self.captured.append((logits, self.head.weight.detach().clone()))
        return torch.nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lightning_callback_measures_every_step(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (4 * T,), generator=gen)
    data = torch.utils.data.DataLoader(list(zip(x, (x + 1) % V)), batch_size=T)
    model = TinyLM()
    callback = ProbeCallback(ProbeConfig(interval=1, log_dir=str(tmp_path)), head=lambda m: m.head)
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(model, data)
    history = callback.probe.history
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    for h, (logits, w) in zip(history, model.captured):
        G, W = logits.grad.double(), w.double()
        U, _, _ = torch.linalg.svd(W, full_matrices=False)
        vis = G @ U @ U.t()
        assert h["destroyed_ratio"] == pytest.approx(((G - vis).norm() / G.norm()).item(), rel=1e-5)
    rows = read_jsonl(os.path.join(tmp_path, "probe.jsonl"))
    assert len(rows) == 4 and 0.9 < rows[0]["probe/destroyed_ratio"] < 1.0
