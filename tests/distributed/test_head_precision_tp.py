"""16-bit non-fused heads at TP=2 (gloo, CPU): the vocab-parallel log-softmax casts to float32 before its max and
sum all-reduces, so a bf16 head's per-token loss and dL/dh at TP=2 are the TP=1 ones (float32-quality: within
2x of Megatron's dense path's error against float64), not bf16-quantised per shard."""
import torch

import megatron_bottleneck as mb
from tests import support_precision as sp

KINDS = ["sigsoftmax", "mos:k=3,fused=false"]
D, V, T = 32, 2048, 128


def losses_at_tp2_and_tp1():
    out = {}
    for tp in (2, 1):
        mb.initialize_parallel(tp, 1, seed=5)
        for kind in KINDS:
            for peaked in (True, False):
                head, p64 = sp.build(kind, D, V, torch.bfloat16)
                w = sp.effective_weight(kind, p64)
                h, y = sp.problem(w, T, peaked, torch.bfloat16)
                x = h.clone().requires_grad_(True)
                loss = head.loss(x, y)
                loss.sum().backward()
                ref = sp._reference(kind, p64, h, y, 30.0)
                out[(kind, peaked, tp)] = {"loss": loss.detach(), "dh": x.grad.detach(), "dtype": str(loss.dtype),
                                           "errors": sp._errors(loss, x.grad, {}, ref)}
                if tp == 1:
                    out[(kind, peaked, tp)]["dense"] = sp.dense_path_errors(w, h, y)
        mb.destroy_parallel()
    return out


def test_16_bit_heads_at_tp2_equal_tp1_with_float32_quality():
    results = mb.launch(losses_at_tp2_and_tp1, 2, timeout=600)
    for r in results:
        for kind in KINDS:
            for peaked in (True, False):
                two, one = r[(kind, peaked, 2)], r[(kind, peaked, 1)]
                case = (kind, "peaked" if peaked else "flat")
                assert two["dtype"] == "torch.float32", case
                torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=str(case))
                dense = one["dense"]
                for key in ("loss", "dh"):
                    assert two["errors"][key] <= 2 * dense[key], (case, key, two["errors"][key], dense[key])
