"""`memobert submit`: the three submitters and the callables their Slurm jobs run (through submitit).

Each run keeps its submitit logs, pickles and a job.json (job ids, command, resources) in one folder:
<train.out_dir>/slurm, <finetune out_dir>/slurm, <preprocess --out>/slurm.

Preemption and time limits (pretraining): Slurm sends USR2 `signal_delay_s` before the time limit
(submitit's --signal) and SIGTERM when it preempts, requeues or cancels a job. The trainer already
turns SIGTERM into "finish this step, write a checkpoint on every rank, return preempted"; the job
routes USR2 to that same handler, then task 0 requeues the job (`scontrol requeue`). On SIGTERM alone
Slurm itself is requeueing or ending the job, so the job only leaves. Either way it leaves no
result file, so a waiting submitter keeps waiting for the requeued run, which resumes from the
checkpoint in the same out_dir by itself.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.helpers import Checkpointable

from memobert.config import ConfigError, to_dict
from slurm.cluster import SlurmProfile, render_sbatch, sbatch_parameters

if TYPE_CHECKING:  # the stages are imported inside the jobs: submitting pays only for what it uses
    from finetune.config import FinetuneConfig
    from preprocessing.config import PreprocessConfig
    from pretrain.config import PretrainConfig
    from pretrain.train import TrainResult

log = logging.getLogger(__name__)

RECORD = "job.json"
FAILED = "failed.json"
# Without Slurm accounting, a job that died without a result would keep submitit's wait() spinning;
# wait_for() gives up this long after the job left the queue.
GONE_GRACE_S = 15.0


@dataclass
class Submitted:
    """What a submitter did: its log folder, the sbatch scripts, the jobs (none on a dry run)."""

    folder: Path
    scripts: dict[str, str]  # role -> sbatch script
    job_ids: dict[str, str] = field(default_factory=dict)  # role -> Slurm job id
    final: submitit.Job | None = None  # the job whose result ends the run
    note: str = ""  # one line for the user


# ---------------------------------------------------------------- pretraining


class PretrainJob(Checkpointable):
    """One rank of a multi-node pretraining job; requeued with itself on the time-limit signal.

    submitit calls `checkpoint()` (inherited: resubmit self) only when USR2 comes before `__call__`
    took the signal over, i.e. before any step of this allocation: then there is nothing to save.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> TrainResult:
        _start_job()
        # submitit reads rank, world size and the master node from SLURM_*. Every rank sees all GPUs
        # of its node and DeepSpeed picks cuda:LOCAL_RANK (submitit's default would hide all but one).
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        dist_env.master_port = master_port(submitit.JobEnvironment().job_id)
        dist_env.export(set_cuda_visible_devices=False)
        log.info("rank %d of %d, rendezvous at %s:%d", dist_env.rank, dist_env.world_size, dist_env.master_addr,
                 dist_env.master_port)
        usr2_received = _route_usr2_to_sigterm()
        from pretrain.train import train

        result = train(self.cfg)
        if result.stopped_by == "preempted":
            _leave(requeue=usr2_received(), why=f"stopped at step {result.step} by a signal; checkpoint {result.checkpoint}")
        return result


def master_port(job_id: str) -> int:
    """The rendezvous port every rank derives from its job id, below Linux's ephemeral range (32768-60999).

    submitit's own choice (20000-60000) mostly lands inside that range, where any outgoing connection on
    the master node may already hold the port (EADDRINUSE at init_process_group).
    """
    return random.Random(job_id).randint(20000, 32767)


def submit_pretrain(cfg: PretrainConfig, profile: SlurmProfile, *, dry_run: bool = False, command: str = "") -> Submitted:
    """One job, `profile.world_size` tasks (one per GPU), each a rank of pretrain.train.train(cfg)."""
    world = profile.world_size
    t = cfg.train
    if t.micro_batch * t.grad_accum * world != t.global_batch:
        raise ConfigError(
            f"config key 'train.global_batch': {t.global_batch} != train.micro_batch ({t.micro_batch}) x train.grad_accum "
            f"({t.grad_accum}) x world size {world} ({profile.nodes} nodes x {profile.ntasks_per_node} tasks per node)"
        )
    run_dir = Path(cfg.train.out_dir).resolve()
    cfg = replace(cfg, train=replace(cfg.train, out_dir=str(run_dir)))  # the job's cwd may differ
    folder = run_dir / "slurm"
    params = sbatch_parameters(profile, "memobert-pretrain", requeue=True)
    submitted = Submitted(folder, {"pretrain": render_sbatch(folder, params)})
    if dry_run:
        return submitted
    job = _executor(folder, params).submit(PretrainJob(cfg))
    submitted.job_ids["pretrain"], submitted.final = job.job_id, job
    _write_record(folder, "pretrain", command, {"pretrain": job.job_id}, {"pretrain": params},
                  {"world_size": world, "config": to_dict(cfg)})
    submitted.note = f"pretraining job {job.job_id} ({world} ranks); logs: {folder}; checkpoints: {run_dir / 'checkpoints'}"
    return submitted


def _route_usr2_to_sigterm() -> Callable[[], bool]:
    """USR2 -> the trainer's SIGTERM handler (checkpoint, stop); returns whether USR2 came."""
    before_training = signal.getsignal(signal.SIGTERM)  # submitit's: logs the signal and ignores it
    received = {"usr2": False}

    def on_usr2(signum: int, frame: Any) -> None:
        received["usr2"] = True
        handler = signal.getsignal(signal.SIGTERM)
        if handler == before_training:
            # The trainer installs its handler right before its first step: nothing new to save yet.
            _leave(requeue=True, why="time-limit signal before the first step")
        handler(signal.SIGTERM, frame)

    signal.signal(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG], on_usr2)
    return lambda: received["usr2"]


def _leave(requeue: bool, why: str) -> NoReturn:
    """End this task without a result file; task 0 first requeues the job when asked."""
    env = submitit.JobEnvironment()
    if requeue and env.global_rank == 0:
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
        log.warning("requeued job %s (%s); it resumes from the last checkpoint", env.job_id, why)
    raise SystemExit(f"task {env.global_rank} of job {env.job_id} leaves: {why}")


# ---------------------------------------------------------------- finetuning


class FinetuneTask(Checkpointable):
    """One training of an array: a (setting, seed) on one fold, or on two that share their training speakers
    (finetune.run.trainings); on the time-limit signal it is requeued and redone."""

    def __init__(self, cfg: FinetuneConfig, setting: str, seed: int, folds: list[int]) -> None:
        self.cfg, self.setting, self.seed, self.folds = cfg, setting, seed, folds

    def __call__(self) -> list[str]:
        _start_job()
        from finetune.run import run_finetune, run_path

        # Its own out_dir: tasks must not share run_finetune's config.json and report files. The runs'
        # JSONs then move (atomically: same filesystem) to where the whole grid's report reads them.
        name = f"{self.setting}_seed{self.seed}_fold{'+'.join(map(str, self.folds))}"
        work = Path(self.cfg.out_dir) / "slurm" / "tasks" / name
        one = replace(self.cfg, settings=[self.setting], seeds=[self.seed], folds=list(self.folds), out_dir=str(work))
        run_finetune(one)
        targets = []
        for fold in self.folds:
            target = run_path(Path(self.cfg.out_dir), self.setting, self.seed, fold)
            target.parent.mkdir(parents=True, exist_ok=True)
            run_path(work, self.setting, self.seed, fold).replace(target)
            targets.append(str(target))
        return targets


class FinetuneReport:
    """The dependent job after the array: the report when every run is there, else the list of failed runs."""

    def __init__(self, cfg: FinetuneConfig, tasks: list[dict[str, Any]]) -> None:
        self.cfg, self.tasks = cfg, tasks

    def __call__(self) -> str:
        _start_job()
        from finetune.run import run_finetune, run_path

        out = Path(self.cfg.out_dir)
        failed = [t for t in self.tasks if not run_path(out, t["setting"], t["seed"], t["fold"]).is_file()]
        if failed:
            (out / "slurm" / FAILED).write_text(json.dumps(failed, indent=2))
            lines = "\n".join(f"  {t['setting']} seed {t['seed']} fold {t['fold']}: job {t['job_id']}, log {t['log']}" for t in failed)
            raise RuntimeError(f"{len(failed)} of {len(self.tasks)} runs failed (listed in {out / 'slurm' / FAILED}):\n"
                               f"{lines}\nrerun the same `memobert submit finetune` command to resubmit only these")
        return str(run_finetune(self.cfg))  # every run's JSON exists: it only writes the report


def submit_finetune(cfg: FinetuneConfig, profile: SlurmProfile, *, dry_run: bool = False, command: str = "") -> Submitted:
    """A job array over the (setting, seed, fold) runs not done yet, one task per training (paired folds share
    one), then a report job after all of them."""
    from finetune.run import (check_and_save_config, check_ready, resolve_precision, run_finetune, run_grid, run_path,
                              trainings)

    check_ready(cfg)
    out = Path(cfg.out_dir).resolve()
    # A run is one process on one device: a multi-node, one-task-per-GPU or whole-node profile (e.g.
    # generic_gpu's 8 GPUs, --exclusive, --mem=0) would start copies of it or hold GPUs it never uses.
    task_profile = replace(profile, nodes=1, tasks_per_node=1, gpus_per_node=min(profile.gpus_per_node, 1),
                           exclusive=False, mem=None if profile.mem == "0" else profile.mem)
    # Resolved here for where the tasks train, not on this (often GPU-less) login node: the tasks, the
    # report job and later reruns then compare the same train.precision.
    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and task_profile.gpus_per_node > 0)
    cfg = resolve_precision(replace(cfg, out_dir=str(out)), cuda=cuda)
    folder = out / "slurm"
    grid = run_grid(cfg)
    todo = [run for run in grid if not run_path(out, *run).is_file()]
    units = [(s, seed, [f.index for f in unit]) for s, seed, unit in trainings(todo, cfg.data.protocol)]
    in_tasks = f"in {len(units)} task{'s' if len(units) != 1 else ''}"
    task_params = sbatch_parameters(task_profile, "memobert-finetune")
    # The report needs no GPU, little memory and little time; it starts when every array task ended, however.
    report_profile = replace(profile, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, exclusive=False,
                             mem=None, time_min=30, signal_delay_s=60)
    report_params = sbatch_parameters(report_profile, "memobert-finetune-report")
    scripts = {"report": render_sbatch(folder, {**report_params, "dependency": "afterany:ARRAY_JOB_ID"})}
    if todo:
        scripts = {"array": render_sbatch(folder, task_params, array_size=len(units)), **scripts}
    submitted = Submitted(folder, scripts)
    if dry_run:
        submitted.note = f"{len(todo)} of {len(grid)} runs to do {in_tasks}, train.precision {cfg.train.precision}"
        return submitted
    # Fail now, not after the array, when out_dir holds runs of another config (a private function of
    # finetune.run: the check its own driver does).
    check_and_save_config(out, cfg)
    if not todo:
        results = run_finetune(cfg)  # nothing to train: only the report, here and now
        submitted.note = f"all {len(grid)} runs were done; report: {results}"
        return submitted

    executor = _executor(folder, task_params)
    with executor.batch():
        jobs = [executor.submit(FinetuneTask(cfg, *unit)) for unit in units]
    array_id = jobs[0].job_id.split("_")[0]
    tasks = [{"setting": s, "seed": seed, "fold": f, "job_id": job.job_id, "log": str(job.paths.stderr)}
             for (s, seed, unit), job in zip(units, jobs) for f in unit]
    (folder / FAILED).unlink(missing_ok=True)  # from an earlier submission: these runs are being redone
    report = _executor(folder, {**report_params, "dependency": f"afterany:{array_id}"}).submit(FinetuneReport(cfg, tasks))
    submitted.job_ids.update(array=array_id, report=report.job_id)
    submitted.final = report
    _write_record(folder, "finetune", command, submitted.job_ids, {"array": task_params, "report": report_params},
                  {"runs": tasks, "grid_size": len(grid), "config": to_dict(cfg)})
    submitted.note = (f"array job {array_id}: {len(todo)} of {len(grid)} runs {in_tasks}, at most "
                      f"{profile.array_parallelism} at once; "
                      f"report job {report.job_id} after it -> {out / 'results.md'}; logs: {folder}")
    return submitted


# ---------------------------------------------------------------- preprocessing


class PreprocessJob(Checkpointable):
    """Every task of the job: a Ray node; task 0 also the driver. Requeued, it resumes (finished units are kept)."""

    def __init__(self, source: Path, out: Path, cfg: PreprocessConfig) -> None:
        self.source, self.out, self.cfg = source, out, cfg

    def __call__(self) -> dict[str, int] | None:
        _start_job()
        from preprocessing.pipeline import preprocess
        from slurm.ray_cluster import run_with_ray_cluster

        env = submitit.JobEnvironment()
        # Per run of the job: a requeued run must not read the previous run's head address.
        rendezvous = self.out / "slurm" / "ray" / f"{env.job_id}_{os.environ.get('SLURM_RESTART_COUNT', '0')}"

        def driver(address: str) -> dict[str, int]:
            manifest = preprocess(self.source, self.out, self.cfg, ray_address=address)
            return {"samples": manifest.num_samples, "shards": len(manifest.shards)}

        return run_with_ray_cluster(driver, rendezvous)


def submit_preprocess(source: Path, out: Path, cfg: PreprocessConfig, profile: SlurmProfile, *, dry_run: bool = False,
                      command: str = "") -> Submitted:
    """One job of `profile.world_size` tasks forming a Ray cluster that preprocesses `source` into `out`."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    folder = out / "slurm"
    # One Ray node per Slurm node by default: Ray shares out the node's cores and GPUs itself (one task
    # per GPU would start several Ray nodes that each see, and count, every GPU of the node).
    profile = replace(profile, tasks_per_node=profile.tasks_per_node or 1)
    params = sbatch_parameters(profile, "memobert-preprocess", requeue=True)
    submitted = Submitted(folder, {"preprocess": render_sbatch(folder, params)})
    if dry_run:
        return submitted
    job = _executor(folder, params).submit(PreprocessJob(source, out, cfg))
    submitted.job_ids["preprocess"], submitted.final = job.job_id, job
    _write_record(folder, "preprocess", command, {"preprocess": job.job_id}, {"preprocess": params},
                  {"source": str(source), "ray_nodes": profile.world_size, "config": to_dict(cfg)})
    submitted.note = f"preprocessing job {job.job_id} (Ray on {profile.world_size} tasks); logs: {folder}; shards: {out}"
    return submitted


# ---------------------------------------------------------------- shared


def wait_for(job: submitit.Job, timeout_s: float | None = None, poll_s: float = 1.0) -> Any:
    """Task 0's result; raises the job's error, or UncompletedJobError when it left the queue without a result."""
    task = job.task(0)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    gone_since: float | None = None
    while not task.paths.result_pickle.exists():
        if _in_queue(job.job_id):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > GONE_GRACE_S:
            raise UncompletedJobError(
                f"job {job.job_id} left the queue without a result; see {task.paths.stderr}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} gave no result within {timeout_s:.0f} s; see {task.paths.stderr}")
        time.sleep(poll_s)
    return task.result()


def _in_queue(job_id: str) -> bool:
    """Pending, running or completing (squeue's default states); unsure (slurmctld busy) counts as queued."""
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return "Invalid job id" not in result.stderr
    return bool(result.stdout.strip())


def _executor(folder: Path, params: dict[str, Any]) -> submitit.SlurmExecutor:
    # SlurmExecutor, not AutoExecutor: the latter picks its cluster by what is on PATH.
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor


def _write_record(folder: Path, kind: str, command: str, job_ids: dict[str, str], resources: dict[str, Any],
                  extra: dict[str, Any]) -> None:
    record = {"kind": kind, "job_ids": job_ids, "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command, "cwd": os.getcwd(), "resources": resources, **extra}
    tmp = folder / f"{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(folder / RECORD)


def _start_job() -> None:
    """Logging and torch's thread count, in the fresh interpreter of a job's task."""
    # Without a handler the stages' INFO lines ("resumed from ...") would be lost.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch

        # torch starts a thread per core of the node; tasks sharing the node then spin on each other's
        # cores (measured: a 2-second finetuning run took 40 s with 2 such tasks on 2 cores).
        torch.set_num_threads(int(cpus))
