"""The head plug-ins in one process: every built-in head at TP=1 against its float64 reference (forward, loss,
gradients, fused == materialised, log_prob_fn's value / VJP / JVP), the registry's and HeadConfig's one-line
refusals, install_head / head_hook / build_gpt_model, the linear probe's refusal of a non-linear head."""
import re

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.head import HeadConfig, check_head, register_head
from tests import support, support_heads

pytestmark = pytest.mark.usefixtures("megatron_one_rank")


def test_every_builtin_head_matches_its_float64_reference_at_tp1():
    results = support_heads.check_heads()
    assert len(results) > 50
    for label, got, want in results:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=2e-4, atol=2e-6, msg=label)
