"""A real two-node Slurm cluster on this machine, for tests (root only).

Debian's ``slurm-wlm`` (slurmctld, slurmd, the clients) and munge: munged with its own key and socket, one
slurmctld, and two ``slurmd -D -N n1|n2``, each in its own UTS namespace (``unshare --uts``) with the
hostname of its node and its own address (127.0.0.2 / 127.0.0.3, all of 127.0.0.0/8 is loopback): torchrun's
c10d store and gloo pick their host by ``gethostname()``, which must differ between the nodes. Every
state, log, pid and spool path lives under one temporary folder; ``SLURM_CONF`` points the clients at it.
``stop()`` ends exactly the daemons it started (by PID), never anything by name.

Usage::

    with SlurmCluster() as c:          # or c = SlurmCluster(); c.start(); ...; c.stop()
        job = c.sbatch(["launch/train.sbatch", "cfg.yaml"], env=...)
        c.wait(job)

``python -m tests.slurm.cluster`` brings one up, prints the ``export SLURM_CONF=...`` line and waits.
See /work/shared/PLATFORM.md ("A real Slurm cluster on one machine") for what each setting avoids.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional, Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "sinfo", "unshare")
NODES = (("n1", "127.0.0.2"), ("n2", "127.0.0.3"))


class ClusterUnavailable(RuntimeError):
    """Why a cluster cannot be brought up here (the test fixture skips with this text)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(install: bool = True) -> None:
    """Install the Debian packages when missing (``apt-get``, as root); raise ClusterUnavailable if impossible."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    if not install or not shutil.which("apt-get"):
        raise ClusterUnavailable(f"Slurm is not installed ({' '.join(PACKAGES)}) and apt-get is unavailable")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "--no-install-recommends", "-y", *PACKAGES], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "--no-install-recommends", "-y", *PACKAGES], env=env,
                           capture_output=True, text=True)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if r.returncode != 0 or missing:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}")


def _ensure_hosts() -> None:
    with open("/etc/hosts", encoding="utf-8") as f:
        known = {w for line in f if not line.lstrip().startswith("#") for w in line.split()[1:]}
    extra = [f"{addr} {name}\n" for name, addr in NODES if name not in known]
    if extra:
        with open("/etc/hosts", "a", encoding="utf-8") as f:
            f.writelines(extra)


class SlurmCluster:
    """Two nodes (n1, n2) with ``cpus`` CPUs each, one partition ``debug``; see the module docstring."""

    def __init__(self, cpus: int = 4, root: Optional[str] = None):
        self.cpus = cpus
        self.root = root
        self.procs: Dict[str, subprocess.Popen] = {}
        self.env: Dict[str, str] = {}
        self.startup_s: Optional[float] = None

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        t0 = time.time()
        if os.geteuid() != 0:
            raise ClusterUnavailable("a local Slurm cluster needs root (slurmd, munged, /etc/hosts)")
        ensure_installed()
        _ensure_hosts()
        self.root = self.root or tempfile.mkdtemp(prefix="mb-slurm-")
        r = self.root
        for d in ("state", "spool", "log", "run", "munge"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        os.chmod(os.path.join(r, "munge"), 0o700)
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.socket = os.path.join(r, "munge", "munge.socket")
        self.conf = os.path.join(r, "slurm.conf")
        self._write_conf()
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        try:
            self._spawn("munged", ["munged", "-F", "--force", "-S", self.socket, "--key-file", key,
                                   "--log-file", f"{r}/log/munged.log", "--pid-file", f"{r}/run/munged.pid",
                                   "--seed-file", f"{r}/munge/munged.seed"])
            self._wait_for(lambda: os.path.exists(self.socket), timeout, "munged socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            for name, _addr in NODES:
                self._spawn(f"slurmd-{name}", ["unshare", "--uts", "sh", "-c",
                                               f"hostname {name} && exec slurmd -D -N {name} -f {self.conf}"])
            self._wait_for(self._nodes_idle, timeout, "both nodes idle (sinfo)")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t0
        return self

    def stop(self) -> None:
        """SIGTERM the daemons this object started (by PID), then SIGKILL whatever is left after 10 s."""
        if getattr(self, "conf", None) and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:  # end the jobs' processes first (slurmstepd and the tasks outlive slurmd otherwise)
                subprocess.run(["scancel", "--full", "--signal=KILL", "-u", "root"], env=self.env,
                               capture_output=True, timeout=20)
                deadline = time.time() + 15
                while time.time() < deadline:
                    r = subprocess.run(["squeue", "-h", "-t", "RUNNING,COMPLETING"], env=self.env,
                                       capture_output=True, text=True, timeout=20)
                    if r.returncode or not r.stdout.strip():
                        break
                    time.sleep(0.3)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------- helpers
    def _write_conf(self) -> None:
        r = self.root
        host = socket.gethostname()
        lines = [
            "ClusterName=mbtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=5,bf_interval=5",
            "MailProg=/bin/true",
            "JobRequeue=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "SlurmdParameters=config_overrides",
            "KillWait=20",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
        ]
        for name, addr in NODES:
            os.makedirs(f"{r}/spool/{name}", exist_ok=True)
            lines.append(f"NodeName={name} NodeHostname={name} NodeAddr={addr} Port={_free_port()} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(n for n, _ in NODES)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=YES")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.out"), "wb")
        self.procs[name] = subprocess.Popen(list(argv), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{dead[0]} exited with status {self.procs[dead[0]].returncode} "
                                         f"(logs in {self.root}/log)")
            if ok():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.root}/log)")

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return len(states) == len(NODES) and all(s == "idle" for s in states.values())

    # ---------------------------------------------------------------- jobs
    def run(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None, check: bool = True,
            timeout: float = 60, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def sbatch(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        """Submit; returns the job id (``--parsable``)."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (the first record; for an array, ask for ``J_T``)."""
        r = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        rec: Dict[str, str] = {}
        for word in (r.stdout.splitlines() or [""])[0].split():
            k, _, v = word.partition("=")
            rec.setdefault(k, v)
        return rec

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_ids, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                            "DEADLINE", "PREEMPTED")) -> Dict[str, str]:
        """Poll until every job is in one of ``states``; returns their states."""
        ids: List[str] = [job_ids] if isinstance(job_ids, str) else list(job_ids)
        deadline = time.time() + timeout
        while True:
            now = {j: self.state(j) for j in ids}
            if all(s in states for s in now.values()):
                return now
            if time.time() > deadline:
                raise TimeoutError(f"jobs still not done after {timeout:.0f} s: {now}")
            time.sleep(0.5)


if __name__ == "__main__":
    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    c = SlurmCluster()
    c.start()
    print(f"cluster up in {c.startup_s:.1f} s; export SLURM_CONF={c.conf}  (Ctrl-C stops it)", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
