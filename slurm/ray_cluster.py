"""A Ray cluster inside one Slurm job: task 0 runs the head and the driver, every other task a worker node.

Task 0 starts `ray start --head --block` on free ports of its node and publishes the address in a
rendezvous folder on the job's shared filesystem; the other tasks read it and `ray start --address
... --block`. The driver waits until every task's node is alive (ray.nodes()), runs its function,
then marks the folder done: each task stops its own `ray start` process (SIGTERM: Ray drains and
ends that node's processes). Never `ray stop`: it would kill every Ray cluster on the machine,
other jobs' and users' included. Each job gets its own Ray temp folder for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")
HEAD_FILE = "head.json"
DONE_FILE = "done"
POLL_S = 0.5


def run_with_ray_cluster(fn: Callable[[str], R], rendezvous: Path, timeout_s: float = 600.0) -> R | None:
    """On task 0: fn(address) once all tasks' nodes joined; elsewhere: serve as a worker node, return None.

    `rendezvous`: a folder on the filesystem all tasks share, fresh for each run of the job.
    """
    import submitit

    env = submitit.JobEnvironment()
    rendezvous.mkdir(parents=True, exist_ok=True)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", os.cpu_count() or 1))
    if env.global_rank == 0:
        # Node-local, short (Ray's socket paths live under it: at most 107 characters) and unique.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"ray_{rendezvous.name}_", dir="/tmp"))
        return _head(fn, rendezvous, temp_dir, cpus, env.num_tasks, timeout_s)
    _worker(rendezvous, cpus, timeout_s)
    return None


def _head(fn: Callable[[str], R], rendezvous: Path, temp_dir: Path, cpus: int, num_nodes: int, timeout_s: float) -> R:
    import ray

    ip = socket.gethostbyname(socket.gethostname())
    port = _free_port()
    head = _ray_start(["--head", f"--port={port}", f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}",
                       "--include-dashboard=false"], ip, cpus)
    address = f"{ip}:{port}"
    succeeded = False
    try:
        _poll(lambda: _port_open(ip, port), timeout_s, "the Ray head did not come up", head)
        ray.init(address=address, logging_level=logging.WARNING)
        _write_json(rendezvous / HEAD_FILE, {"address": address, "temp_dir": str(temp_dir)})  # temp_dir: Ray's logs
        _poll(lambda: len(_alive_nodes()) >= num_nodes, timeout_s,
              f"not every task's Ray node joined (expected {num_nodes})", head)
        log.info("Ray cluster at %s: %d nodes alive, resources %s", address, len(_alive_nodes()), ray.cluster_resources())
        result = fn(address)
        succeeded = True
        return result
    finally:
        (rendezvous / DONE_FILE).touch()  # the workers leave now, also when the driver failed
        ray.shutdown()
        _stop(head)
        if succeeded:  # keep the Ray logs of a failed run for debugging
            shutil.rmtree(temp_dir, ignore_errors=True)


def _worker(rendezvous: Path, cpus: int, timeout_s: float) -> None:
    head_file, done = rendezvous / HEAD_FILE, rendezvous / DONE_FILE
    _poll(lambda: head_file.is_file() or done.exists(), timeout_s, "task 0 published no Ray head address")
    if done.exists():
        raise RuntimeError("task 0 ended before its Ray head came up; see its log")
    address = json.loads(head_file.read_text())["address"]
    ip = socket.gethostbyname(socket.gethostname())
    node = _ray_start([f"--address={address}"], ip, cpus)
    try:
        # No deadline: the driver's work takes as long as it takes; a dead node ends the wait.
        while not done.exists():
            if node.poll() is not None:
                raise RuntimeError(f"this task's Ray node exited ({node.returncode}) before the driver finished")
            time.sleep(POLL_S)
    finally:
        _stop(node)


def _ray_start(args: list[str], ip: str, cpus: int) -> subprocess.Popen:
    """`ray start --block` as a child process: its SIGTERM ends this node and nothing else."""
    ray_bin = Path(sys.executable).with_name("ray")  # the venv's, whatever PATH the job has
    # Free ports for what would otherwise default to fixed ones: several nodes may share a host.
    cmd = [str(ray_bin), "start", "--block", *args, f"--node-ip-address={ip}", f"--num-cpus={cpus}",
           f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
    log.info("starting a Ray node: %s", " ".join(cmd))
    return subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})


def _stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((ip, port)) == 0


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node["Alive"]]


def _poll(condition: Callable[[], bool], timeout_s: float, message: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{message}: `ray start` exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: a reader never sees half a file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
