"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm and munge
packages, on loopback ports, with their state, logs and key in one folder; stopped by PID.

``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` need no cgroups, so it runs in a container as
root. The node declares more CPUs than the machine has (``SlurmdParameters=config_overrides``), so that every
job of a test runs at once.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, Optional

from finegrained.bench.serve import free_port

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")
DAEMON_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def why_not_available() -> Optional[str]:
    """Why a cluster cannot start here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a test SLURM cluster runs its daemons as root; these tests run as another user"
    path = os.pathsep.join([os.environ.get("PATH", "")] + list(DAEMON_DIRS))
    missing = [name for name in DAEMONS if shutil.which(name, path=path) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge "
                f"(make setup does it where it can)")
    return None


def _binary(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", "")] + list(DAEMON_DIRS)))


class SlurmCluster:
    """``start()`` the daemons in ``folder``; ``env`` is what a client needs (``SLURM_CONF``); ``stop()``."""

    def __init__(self, folder: str, cpus: int = 8):
        self.folder = folder
        self.cpus = cpus
        self.conf = os.path.join(folder, "slurm.conf")
        self.env: Dict[str, str] = {"SLURM_CONF": self.conf}

    def _write_config(self) -> None:
        d = self.folder
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        os.chmod(os.path.join(d, "munge"), 0o700)
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=finegrained-tests
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=5
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self._write_config()
        d = self.folder
        env = {**os.environ, **self.env}
        key = os.path.join(d, "munge", "munge.key")
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        subprocess.run([_binary("munged"), f"--key-file={key}", f"--socket={d}/munge/munge.sock",
                        f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                        f"--seed-file={d}/munge/munge.seed", "--force"], check=True, capture_output=True)
        subprocess.run([_binary("slurmctld"), "-i"], check=True, capture_output=True, env=env)
        subprocess.run([_binary("slurmd")], check=True, capture_output=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run([_binary("sinfo"), "--noheader", "--format", "%T"], capture_output=True, text=True,
                                   env=env).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test SLURM cluster did not come up in {timeout_s} s; see {d}/slurmctld.log")

    def release(self, job_id: str) -> None:
        """Let a requeued job start now (SLURM holds a requeued job back for a while: Reason=BeginTime)."""
        subprocess.run([_binary("scontrol"), "update", f"JobId={job_id}", "StartTime=now"], check=True,
                       env={**os.environ, **self.env}, capture_output=True)

    def stop(self) -> None:
        env = {**os.environ, **self.env}
        subprocess.run([_binary("scancel"), "--user", "root"], env=env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = os.path.join(self.folder, pid_file)
            try:
                pid = int(open(path).read().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
