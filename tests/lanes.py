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
