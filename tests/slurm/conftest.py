"""Session fixture: a real two-node Slurm cluster on this machine (see cluster.py); skips with the reason
when it cannot run here (not root, no apt-get / packages, a daemon that does not come up)."""
import os
import signal

import pytest

from ..lanes import NOT_README_LANE, README_LANE
from .cluster import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.environ.get("MB_SKIP_SLURM"):
        pytest.skip("MB_SKIP_SLURM is set")
    if not README_LANE:
        pytest.skip(NOT_README_LANE)
    cluster = SlurmCluster(cpus=4)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no local Slurm cluster: {exc}")

    def interrupt(*_):  # SIGTERM (a CI timeout, kill PID): let the teardown stop the daemons
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt) if signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None) else None
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
