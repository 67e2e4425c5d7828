"""Every built-in head on real TP ranks (gloo, CPU), in one spawn of 2 ranks: forward, loss and gradients at
TP=2 and TP=2 + SP equal the single-process float64 reference (fused == materialised where fused exists), the
general probe's log_prob_fn (value, VJP, JVP under torch.func) at TP=2, and checkpoints saved at TP=2 load at
TP=1 (same full parameters)."""
import torch

import megatron_bottleneck as mb
from tests import support_heads


def test_heads_at_tp2_and_sp_and_checkpoint_to_tp1(tmp_path):
    results = mb.launch(support_heads.heads_on_layout, 2, 2, True, str(tmp_path), timeout=400)
    labels = set()
    for per_rank in results:
        for label, got, want in per_rank:
            labels.add(label)
            torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-6, msg=label)
    for kind in support_heads.KINDS:
        for part in ("loss", "forward", "log_prob_fn VJP dh", "log_prob_fn JVP", "checkpoint"):
            assert any(x.startswith(f"{kind} {part}") for x in labels), (kind, part)
    assert any("sp=True" in x for r in results for x, _, _ in r)
