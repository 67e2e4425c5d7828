"""Issue 28's renames: the deprecated names still resolve to the new objects, each with one DeprecationWarning
per place of use; the removed ``LossRequest.logits`` is refused; no module-level caches behind
``fused_model_class``."""
import importlib
import sys
import warnings

import pytest
import torch


def _deprecations(fn, times=1):
    """The DeprecationWarnings ``fn()`` gives, called ``times`` times from one line (the default filter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(times):
            value = fn()
    return value, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_heads_fused_module_is_a_deprecated_alias_of_model_loss():
    from megatron_bottleneck.heads import model_loss

    saved = sys.modules.pop("megatron_bottleneck.heads.fused", None)
    try:
        fused, caught = _deprecations(lambda: importlib.import_module("megatron_bottleneck.heads.fused"))
        assert len(caught) == 1 and "megatron_bottleneck.heads.model_loss" in str(caught[0].message)
        for name in model_loss.__all__ + ["check_fusable"]:
            assert getattr(fused, name) is getattr(model_loss, name), name
    finally:
        if saved is not None:
            sys.modules["megatron_bottleneck.heads.fused"] = saved


def test_fused_head_mixin_alias_and_the_heads_mro():
    from megatron_bottleneck.heads import contract
    from megatron_bottleneck.heads.low_rank import LowRankOutputLayer
    from megatron_bottleneck.heads.model_loss import DenseOutputLayer
    from megatron_bottleneck.heads.mos import MixtureOfSoftmaxesHead
    from megatron_bottleneck.heads.stacked import StackedHead
    from megatron_bottleneck.heads.vocab_parallel import VocabParallelHead

    alias, caught = _deprecations(lambda: contract.FusedHeadMixin, times=3)
    assert alias is contract.LinearLossMixin
    assert len(caught) == 1 and "LinearLossMixin" in str(caught[0].message)  # once per place of use
    with pytest.raises(AttributeError):
        contract.NoSuchMixin  # noqa: B018
    # the stacked head's loss is the linear one by its bases, not by a copied attribute
    assert "loss" not in StackedHead.__dict__ and StackedHead.loss is contract.LinearLossMixin.loss
    assert StackedHead.check_loss_spec is VocabParallelHead.check_loss_spec
    for cls in (DenseOutputLayer, LowRankOutputLayer):
        assert cls.loss is contract.LinearLossMixin.loss
    assert issubclass(VocabParallelHead, contract.HeadContractMixin)
    assert not issubclass(VocabParallelHead, contract.LinearLossMixin)
    assert MixtureOfSoftmaxesHead.loss is not contract.LinearLossMixin.loss


def test_head_view_factor_and_its_deprecated_basis_name():
    from megatron_bottleneck.base.head import HeadView

    f = torch.randn(6, 3)
    view = HeadView(factor=f, mix=None, vocab_start=2, vocab_size=5)
    assert view.factor is f and view.valid_rows() == 3
    basis, caught = _deprecations(lambda: view.basis, times=2)
    assert basis is f and len(caught) == 1 and "HeadView.factor" in str(caught[0].message)
    old, caught = _deprecations(lambda: HeadView(basis=f, mix=None, vocab_start=0, vocab_size=6))
    assert old == HeadView(f, None, 0, 6) and len(caught) == 1
    with pytest.raises(TypeError, match="not both"):
        HeadView(factor=f, basis=f)


def test_loss_request_has_no_logits_switch():
    import megatron_bottleneck as mb

    assert mb.LossRequest(record=True).record
    with pytest.raises(TypeError):
        mb.LossRequest(logits=True)


def test_fused_model_class_one_subclass_per_class_without_a_cache():
    from megatron_bottleneck.heads import model_loss

    class Base(torch.nn.Module):
        def compute_language_model_loss(self, labels, logits):
            return logits

    made = model_loss.fused_model_class(Base)
    assert made is model_loss.fused_model_class(Base) and made.__bases__ == (model_loss.FusedLossModel, Base)
    assert model_loss.fused_model_class(made) is made
    assert not any(isinstance(v, dict) and Base in v for v in vars(model_loss).values())
