"""Which CI lane runs the tests. The minutes-long tests that drive the same scripts in every lane (real
Slurm jobs, README's code blocks) run once, in README's own environment: Python 3.11 + megatron-core 0.16.1,
what ``launch/setup_cpu.sh`` installs. The 3.12 lane (megatron-core 0.19) runs everything else, including the
trainer, Megatron-LM core_v0.19.0 and Bridge tests, within CI's time budget."""
from importlib.metadata import PackageNotFoundError, version

try:
    MEGATRON_CORE = version("megatron-core")
except PackageNotFoundError:  # a source checkout
    MEGATRON_CORE = "unknown"

README_LANE = MEGATRON_CORE.startswith("0.16.")
NOT_README_LANE = (f"run in README's lane (megatron-core 0.16.x, launch/setup_cpu.sh); this lane has megatron-core "
                   f"{MEGATRON_CORE}: the same scripts, tested once to keep CI within its time budget")

# The other lane (megatron-core 0.19) takes a few minutes-long, version-independent tests that README's lane
# would otherwise also carry, so that the two lanes, run side by side, end together.
OTHER_LANE = not README_LANE
NOT_OTHER_LANE = (f"run in the megatron-core 0.19 lane only (the 3.12 CI lane), to balance the lanes' CI time; this "
                  f"lane has megatron-core {MEGATRON_CORE}")
