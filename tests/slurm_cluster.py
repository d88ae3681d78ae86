"""A real one-node Slurm cluster on 127.0.0.1 for the tests: Debian's slurmctld and slurmd, started as root
from a generated slurm.conf in a temp folder (no munge: auth/none), stopped by the PIDs they wrote."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


def ensure_installed() -> str | None:
    """None when Slurm is here (installing it where apt is usable as root); else why it cannot be."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (
            "Slurm is not installed and cannot be "
            "(needs root and apt-get: apt-get install slurmctld slurmd slurm-client)"
        )
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, folder: Path, cpus: int = 2):
        self.folder, self.host = folder, socket.gethostname().split(".")[0]
        for name in ("state", "spool", "log"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        ctld, node = free_port(), free_port()
        self.conf = folder / "slurm.conf"
        self.conf.write_text(f"""ClusterName=kdist-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={node}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname={self.host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(map(str, args)), env=env or self.env, capture_output=True, text=True, check=check, **kwargs
        )

    def start(self, timeout: float = 30) -> None:
        self.run("slurmctld", "-f", self.conf)
        self.run("slurmd", "-f", self.conf, "-N", "localhost")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm node did not become idle: {state!r}; see {self.folder}/log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)

    def job_state(self, job_id: str) -> str:
        text = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in text.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(
        self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout: float = 600
    ) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")
