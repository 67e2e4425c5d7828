"""CPU mode: every patch guarded, originals kept, enable / disable / enable again, the context manager."""
import os

import pytest
import torch

import megatron_bottleneck as mb
from megatron_bottleneck.base.errors import CpuModeError
from megatron_bottleneck.integrations import cpu


@pytest.fixture(autouse=True)
def off_afterwards():
    yield
    mb.disable_cpu_mode()


def test_enable_disable_enable():
    from megatron.core.pipeline_parallel import p2p_communication

    original_device, original_p2p = torch.cuda.current_device, p2p_communication._batched_p2p_ops
    for _ in range(2):
        mb.enable_cpu_mode()
        mb.enable_cpu_mode()  # idempotent
        assert mb.is_cpu_mode() and torch.cuda.current_device() == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
        assert torch.ones(1).type() == "torch.cuda.FloatTensor" and torch.ones(1).type(torch.float64).dtype == torch.float64
        assert p2p_communication._batched_p2p_ops is not original_p2p
        assert "megatron.core.pipeline_parallel.p2p_communication._batched_p2p_ops" in cpu.cpu_mode_patches()
        mb.disable_cpu_mode()
        assert not mb.is_cpu_mode() and cpu.cpu_mode_patches() == []
        assert torch.cuda.current_device is original_device and p2p_communication._batched_p2p_ops is original_p2p
        assert torch.ones(1).type() == "torch.FloatTensor"
        if not torch.cuda.is_available():
            with pytest.raises((RuntimeError, AssertionError)):
                torch.zeros(1, device="cuda")


def test_context_manager_leaves_things_as_found():
    with mb.cpu_mode():
        assert mb.is_cpu_mode()
    assert not mb.is_cpu_mode()
    mb.enable_cpu_mode()
    with mb.cpu_mode():
        pass
    assert mb.is_cpu_mode()  # it was on before the block


def test_the_tracker_rng_goes_to_a_private_generator():
    from megatron.core.tensor_parallel import random as mrandom

    with mb.cpu_mode():
        state = torch.get_rng_state()
        torch.cuda.manual_seed(5)
        a = mrandom._get_cuda_rng_state()
        torch.cuda.manual_seed(5)
        assert torch.equal(a, mrandom._get_cuda_rng_state())
        assert torch.equal(state, torch.get_rng_state())  # torch's own CPU generator untouched


def test_a_missing_target_raises_naming_it_and_changes_nothing(monkeypatch):
    bogus = cpu.Patch("megatron.core.pipeline_parallel.p2p_communication", "_renamed_in_a_future_release",
                      lambda original: None, "test")
    monkeypatch.setattr(cpu, "CORE_PATCHES", cpu.CORE_PATCHES + (bogus,))
    original = torch.cuda.current_device
    with pytest.raises(CpuModeError, match=r"cannot patch megatron.core.pipeline_parallel.p2p_communication."
                                           r"_renamed_in_a_future_release: it does not exist in megatron-core 0\."):
        mb.enable_cpu_mode()
    assert not mb.is_cpu_mode() and torch.cuda.current_device is original


def test_patch_sets_apply_only_when_their_package_imports(monkeypatch):
    monkeypatch.setattr(cpu.CPU_MODE, "patch_sets", {})
    cpu.register_patch_set("absent", "a_package_that_is_not_installed", lambda: [])
    cpu.register_patch_set("json", "json", lambda: [cpu.Patch("json", "dumps", lambda orig: lambda *a, **k: "patched",
                                                              "test")])
    import json

    with mb.cpu_mode():
        assert json.dumps({}) == "patched" and "json.dumps" in cpu.cpu_mode_patches()
    assert json.dumps({}) == "{}"


def _gloo_threads() -> int:
    import glob

    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            names.append(open(path).read().strip())
        except OSError:
            pass
    return sum(n.startswith(("pt_gloo", "gloo_")) for n in names)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="counts threads through /proc (Linux)")
@pytest.mark.usefixtures("megatron_one_rank")
def test_rebuilding_parallel_state_does_not_accumulate_process_groups():
    """Megatron's destroy_model_parallel only forgets its groups (each gloo group keeps its threads): the zoo's
    and the sweep's workers, which build parallel state once per run, grew to 450 idle gloo threads."""
    from megatron.core import parallel_state

    mb.initialize_parallel(1, 1, seed=1)
    groups = mb.integrations.parallel.megatron_groups()
    assert groups and parallel_state.get_tensor_model_parallel_group() in groups
    del groups  # a reference keeps a group (and its threads) alive
    one = _gloo_threads()  # parallel state built once
    mb.destroy_parallel()
    none = _gloo_threads()
    assert none < one and not parallel_state.model_parallel_is_initialized()
    for _ in range(5):
        mb.initialize_parallel(1, 1, seed=1)
    # five builds hold about one build's threads (a few start or end late), not five builds' (the leak)
    assert _gloo_threads() - none < 1.5 * (one - none), (none, one, _gloo_threads())
