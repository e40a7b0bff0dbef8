"""Cluster profiles (configs/slurm/*.yaml): where a job runs and how big it is, as submitit's sbatch parameters."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memobert.config import ConfigError, check

# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


@dataclass
class SlurmProfile:
    """A cluster's partition and per-node shape; None leaves an option to the cluster's default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. "h100|a100"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # 0: one task per GPU (pretraining's one rank per GPU), 1 on nodes without GPUs
    cpus_per_task: int = 1
    mem: str | None = None  # per node, sbatch syntax ("64G"); "0" asks for all of a node's memory
    # Minutes, as submitit counts them. The --time flag also takes sbatch's formats (H:M:S, D-H:M:S);
    # a YAML file holds minutes because YAML 1.1 reads an unquoted 4:00:00 as the number 14400.
    time_min: int = 60
    exclusive: bool = False
    # Slurm sends USR2 this long before the time limit: enough to finish a step and write a checkpoint.
    signal_delay_s: int = 120
    array_parallelism: int = 16  # finetuning arrays: at most this many tasks run at once
    setup: list[str] = field(default_factory=list)  # shell lines before the job step: module load ..., source ...
    sbatch: dict[str, str] = field(default_factory=dict)  # any other sbatch option, e.g. {"reservation": "x"}

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task", "time_min", "array_parallelism"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("gpus_per_node", "tasks_per_node", "signal_delay_s"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.signal_delay_s < self.time_min * 60, "signal_delay_s", f"must be shorter than time_min ({self.time_min} min)")

    @property
    def ntasks_per_node(self) -> int:
        """Tasks per node: as set, else one per GPU, else one."""
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def parse_time(text: str) -> int:
    """sbatch's --time formats -> whole minutes (rounded up), e.g. '1-02:00:00' -> 1560, '90' -> 90."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(f"config key 'time_min': cannot read {text!r} as a time (M, H:M:S or D-H:M:S)")
    days = int(match["d"] or 0)
    parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
    if match["d"] is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # M or M:S
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_s // 60))


def sbatch_parameters(profile: SlurmProfile, job_name: str, *, requeue: bool = False) -> dict[str, Any]:
    """The profile as submitit SlurmExecutor parameters (one task per rank, `srun` per job)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": profile.nodes,
        "ntasks_per_node": profile.ntasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "time": profile.time_min,
        "signal_delay_s": profile.signal_delay_s,
        "array_parallelism": profile.array_parallelism,
    }
    optional = {
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "constraint": profile.constraint,
        "mem": profile.mem,
        "gpus_per_node": profile.gpus_per_node or None,
        "exclusive": profile.exclusive or None,
        "setup": list(profile.setup) or None,
    }
    params.update({key: value for key, value in optional.items() if value is not None})
    extra: dict[str, Any] = dict(profile.sbatch)
    if requeue:
        extra["requeue"] = True  # some sites default to JobRequeue=0; the trainer's jobs must be requeueable
    if extra:
        params["additional_parameters"] = extra
    return params


def render_sbatch(folder: Path, params: dict[str, Any], array_size: int | None = None) -> str:
    """The sbatch script submitit would submit with `params` (for --dry-run; needs no Slurm installed)."""
    # submitit's own template (private, but the executor renders real submissions with it too).
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size, **params)
