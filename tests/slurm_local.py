"""A private single-node Slurm cluster for tests: munged, slurmctld and slurmd from a temp folder.

Everything (key, sockets, spool, state, logs) lives under one folder and the ports are free ones
picked at start, so several such clusters (other engineers' test sessions) can share a machine.
Clients find it through SLURM_CONF, which `start` returns and the caller exports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
PARTITION = "debug"  # configs/slurm/local_test.yaml names it


def missing_binaries() -> list[str]:
    """The Slurm / munge programs that are not installed (the tests skip when any is missing)."""
    return [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]


@dataclass
class LocalSlurm:
    """A running private cluster; `stop()` ends its daemons by their PIDs."""

    root: Path
    conf: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def stop(self, timeout_s: float = 60.0) -> None:
        """Cancel what is left and wait for it to end, then stop slurmd, slurmctld and munged, in that order."""
        env = {**os.environ, **self.env}
        if len(self.processes) == 3 and all(proc.poll() is None for proc in self.processes):  # a cluster that came up
            subprocess.run(["scancel", "--user", str(os.getuid())], env=env, capture_output=True, timeout=30)
            # slurmd must outlive the jobs, or their processes (ranks, Ray nodes) would be left behind.
            deadline = time.monotonic() + timeout_s
            while _ok(["squeue", "-h", "-o", "%i"], env, "") and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of each daemon's log, for failure messages."""
        logs = sorted([*self.root.glob("*.log"), *self.root.glob("*.stdout")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


def start(root: Path, timeout_s: float = 60.0) -> LocalSlurm:
    """Write a slurm.conf under `root`, start the daemons and wait until the node is idle."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge.socket"
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, munge_socket, ctld_port=_free_port(), slurmd_port=_free_port()))
    cluster = LocalSlurm(root=root, conf=conf)
    env = {**os.environ, **cluster.env}
    try:
        cluster.processes.append(_spawn(
            ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}", f"--log-file={root / 'munged.log'}"],
            root, env))
        _wait(munge_socket.exists, timeout_s, "munged did not create its socket", cluster)
        cluster.processes.append(_spawn(["slurmctld", "-D", "-i", "-f", str(conf)], root, env))
        _wait(lambda: _ok(["scontrol", "ping"], env, "UP"), timeout_s, "slurmctld did not answer", cluster)
        cluster.processes.append(_spawn(["slurmd", "-D", "-f", str(conf), "-N", host], root, env))
        _wait(lambda: _ok(["sinfo", "-h", "-o", "%t"], env, "idle"), timeout_s, "the node did not become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _slurm_conf(root: Path, host: str, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
    cpus = os.cpu_count() or 1
    # Half the machine's memory: slurmd refuses a node that claims more than it has.
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (2 * 1024 * 1024)
    return "\n".join([
        "ClusterName=memobert-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        # Frequent scheduling passes: a requeued job starts as soon as it is eligible.
        "SchedulerParameters=bf_interval=1,sched_interval=1",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SwitchType=switch/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "JobRequeue=1",
        "ReturnToService=2",
        "KillWait=30",
        "MinJobAge=600",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        # Jobs may share cores: a job whose tasks are still exiting does not hold up the next test's job.
        f"PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
        "",
    ])


def _spawn(cmd: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen:
    program = shutil.which(cmd[0], path=SEARCH_PATH)
    with (root / f"{cmd[0]}.stdout").open("w") as out:
        # A session of its own: Ctrl-C on pytest does not reach the daemons; stop() ends them.
        return subprocess.Popen([program, *cmd[1:]], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)


def _ok(cmd: list[str], env: dict[str, str], expect: str) -> bool:
    """The command succeeds and prints `expect` ("" for any output)."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and (expect in result.stdout if expect else bool(result.stdout.strip()))


def _wait(condition: Callable[[], bool], timeout_s: float, message: str, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc in cluster.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {message}\n{cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout_s:.0f} s\n{cluster.log_tail()}")
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
