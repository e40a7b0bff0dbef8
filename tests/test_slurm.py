"""`memobert submit` on a real private single-node Slurm cluster (fixture slurm_cluster): sbatch, srun, requeue.

Jobs are tiny (2 tasks on 2 cores): DeepSpeed on gloo, finetuning of the tiny flavor, Ray over 2 tasks.
Where Slurm is not installed the tests that need the cluster skip (the fixture says why).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_DIMS, shard_digests, write_tiny_shards
from finetune.protocols import iemocap_folds
from memobert.config import load_config
from memobert.schema import Manifest

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["--profile", str(REPO / "configs/slurm/local_test.yaml")]
TINY = ["--config", str(REPO / "configs/pretrain/cpu_tiny.yaml"), f"model.acoustic_dim={TINY_DIMS['audio']}",
        f"model.visual_dim={TINY_DIMS['visual']}"]
# 2 ranks: global batch 16 = micro-batch 4 x accumulation 2 x world size 2.
TWO_RANKS = ["train.micro_batch=4", "train.grad_accum=2", "optim.warmup_steps=1"]
SPEAKERS = [speaker for fold in iemocap_folds()[::2] for speaker in (fold.test, fold.val)]  # Ses01F, Ses01M, ...
FINETUNE_FAST = ["model.flavor=tiny", "train.lr=3e-3", "train.batch_size=16", "train.direct_steps=16", "train.val_every=8",
                 "train.patience=1", "train.device=cpu", "train.precision=fp32"]


def _memobert(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "memobert.cli", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"memobert {' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def _poll(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def _logs(folder: Path, job_id: str) -> dict[int, str]:
    """Task -> its stdout + stderr (submitit writes <job>_<task>_log.{out,err})."""
    logs = {}
    for err in sorted(folder.glob(f"{job_id}_*_log.err")):
        task = int(err.name.split("_")[-2])
        logs[task] = err.with_suffix(".out").read_text(errors="replace") + err.read_text(errors="replace")
    return logs


def _metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("slurm_shards") / "train", 96, 4, seed=0, vocab_size=1000)


@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:30", 31), ("1:30:00", 90), ("2-0", 2880), ("1-1:30", 1530),
                                          ("1-02:00:00", 1560)])
def test_time_limits_in_sbatch_formats(text: str, minutes: int) -> None:
    from slurm.cluster import parse_time

    assert parse_time(text) == minutes


def test_profile_rejects_a_signal_later_than_the_limit() -> None:
    from memobert.config import ConfigError
    from slurm.cluster import SlurmProfile

    with pytest.raises(ConfigError, match="'signal_delay_s'"):
        load_config(SlurmProfile, [], ["time_min=2", "signal_delay_s=120"])
    assert load_config(SlurmProfile, [], ["gpus_per_node=4", "nodes=2"]).world_size == 8  # one task per GPU


def test_the_rendezvous_port_comes_from_the_job_id_and_avoids_the_ephemeral_range() -> None:
    import random

    from slurm.submit import master_port

    ports = [master_port(str(job_id)) for job_id in range(1, 2001)]
    assert all(20000 <= port < 32768 for port in ports)  # Linux's default ephemeral range starts at 32768
    assert master_port("1") == master_port("1")  # every rank of a job, and its requeued run, agree
    assert len(set(ports)) > 1500  # two jobs on one master node rarely share it
    # submitit's own choice for the private cluster's first job sits in the range (a CI run hit EADDRINUSE)
    assert random.Random("1").randint(20000, 60000) >= 32768


def test_dry_run_prints_the_requested_resources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from memobert.cli import main

    main(["submit", "pretrain", "--profile", str(REPO / "configs/slurm/generic_gpu.yaml"), "--nodes", "2",
          "--gpus-per-node", "4", "--partition", "h100", "--time", "1-02:00:00", "--account", "proj", "--dry-run",
          "--config", str(REPO / "configs/pretrain/memobert_base.yaml"), "train.micro_batch=80", "train.grad_accum=1",
          f"train.out_dir={tmp_path / 'run'}"])
    script = capsys.readouterr().out
    for line in ("--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--partition=h100", "--time=1560",
                 "--account=proj", "--exclusive", "--requeue", "--signal=USR2@180"):
        assert f"#SBATCH {line}\n" in script, line
    assert f"--output={tmp_path / 'run/slurm'}/%j_0_log.out" in script  # logs beside the run
    assert "train:\n  global_batch: 640\n  micro_batch: 80" in script  # the resolved config
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written

    with pytest.raises(SystemExit) as wrong:
        main(["submit", "pretrain", "--nodes", "3", "--gpus-per-node", "8", "--dry-run", "model.init_from=none"])
    assert wrong.value.code == 2 and "world size 24 (3 nodes x 8 tasks per node)" in capsys.readouterr().err

    labeled = write_tiny_shards(tmp_path / "labeled", 8, 1, speakers=SPEAKERS)
    main(["submit", "finetune", *LOCAL, "--data", str(labeled), "--settings", "direct", "--seeds", "1,2", "--folds", "1,2",
          "--out", str(tmp_path / "ft"), "--array-parallelism", "3", "--dry-run"])
    array = capsys.readouterr().out
    # Folds 1 and 2 share their training speakers: one task trains each seed for both (2 tasks, so at most 2 at once).
    assert "#SBATCH --array=0-1%2\n" in array and "#SBATCH --dependency=afterany:ARRAY_JOB_ID" in array
    assert "4 of 4 runs to do in 2 tasks, train.precision fp32" in array  # auto, resolved for the GPU-less nodes


def test_finetune_tasks_ask_for_one_gpu_not_the_profiles_whole_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from memobert.cli import main

    labeled = write_tiny_shards(tmp_path / "labeled", 8, 1, speakers=SPEAKERS)
    submit = ["submit", "finetune", "--profile", str(REPO / "configs/slurm/generic_gpu.yaml"), "--data", str(labeled),
              "--settings", "direct", "--seeds", "1", "--folds", "1", "--out", str(tmp_path / "ft"), "--dry-run"]
    for extra, task_mem in (([], None), (["--mem", "64G"], "64G")):
        main([*submit, *extra])
        printed = capsys.readouterr().out
        array, report = printed.split("# ---- resolved")[0].split("# ---- sbatch script: report")
        # generic_gpu is whole 8-GPU nodes (--exclusive, --mem=0) for pretraining; a run is one process on one GPU.
        assert "#SBATCH --gpus-per-node=1\n" in array and "--exclusive" not in array
        assert [line for line in array.splitlines() if line.startswith("#SBATCH --mem")] == (
            [f"#SBATCH --mem={task_mem}"] if task_mem else [])  # "0" (the whole node) becomes the cluster's default
        assert "--gpus-per-node" not in report and "--mem" not in report and "--exclusive" not in report
        assert "#SBATCH --cpus-per-task=1\n" in report
        assert "1 of 1 runs to do in 1 task, train.precision bf16" in printed  # auto on the tasks' GPU, not this GPU-less host


@pytest.mark.slow
def test_pretrain_two_tasks_trains_logs_and_checkpoints(slurm_cluster, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _memobert("submit", "pretrain", *LOCAL, "--tasks-per-node", "2", "--wait", *TINY, *TWO_RANKS,
                       f"data.train_shards={shards}", f"train.out_dir={out}", "train.steps=6", "train.log_every=1",
                       "train.ckpt_every=3")
    assert "pretraining stopped at step 6 (finished)" in result.stdout
    assert _metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    for step in (3, 6):
        state = json.loads((out / f"checkpoints/step_{step}/trainer_state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2
    record = json.loads((out / "slurm/job.json").read_text())
    job_id = record["job_ids"]["pretrain"]
    assert record["resources"]["pretrain"]["ntasks_per_node"] == 2 and record["command"].startswith("memobert submit")
    logs = _logs(out / "slurm", job_id)
    assert set(logs) == {0, 1} and "global_rank=1(2)" in logs[1]  # one log per rank
    from slurm.submit import master_port

    assert all(f":{master_port(job_id)}" in logs[rank] for rank in (0, 1))  # the port below the ephemeral range


@pytest.mark.slow
def test_time_limit_signal_requeues_the_job_which_resumes(slurm_cluster, shards: Path, tmp_path: Path) -> None:
    from pretrain.config import PretrainConfig
    from slurm.cluster import SlurmProfile
    from slurm.submit import submit_pretrain, wait_for

    out = tmp_path / "run"
    steps = 30
    cfg = load_config(PretrainConfig, [TINY[1]], [*TINY[2:], *TWO_RANKS, f"data.train_shards={shards}",
                                                   f"train.out_dir={out}", f"train.steps={steps}", "train.log_every=1",
                                                   "train.ckpt_every=1000"])
    profile = load_config(SlurmProfile, [LOCAL[1]], ["tasks_per_node=2"])
    job = submit_pretrain(cfg, profile).final
    metrics = out / "metrics.jsonl"
    _poll(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, 240, "training did not start")
    # What Slurm sends `signal_delay_s` before the time limit (submitit's --signal) to the job's tasks.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)

    result = wait_for(job, timeout_s=300)
    assert result.step == steps and result.stopped_by == "finished"
    log = (out / "slurm" / f"{job.job_id}_0_log.err").read_text()
    (stopped,) = [int(step) for step in re.findall(r"SIGTERM: checkpoint written at step (\d+)", log)]
    assert 3 <= stopped < steps and f"requeued job {job.job_id}" in log  # the job requeued itself
    assert (out / f"checkpoints/step_{stopped}").is_dir()
    assert f"resumed from {out / 'checkpoints'} at step {stopped}" in log
    assert _metrics_steps(out) == list(range(1, steps + 1))  # continued where it stopped: no step twice, none lost
    shown = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown


@pytest.mark.slow
def test_finetune_array_reports_failed_runs_then_resubmits_only_those(slurm_cluster, tmp_path: Path) -> None:
    labeled = tmp_path / "labeled"
    no_session5 = [s for s in SPEAKERS if not s.startswith("Ses05")]  # fold 9 tests Ses05F: it must fail
    write_tiny_shards(labeled, 64, 2, seed=0, speakers=no_session5, class_signal=3.0)
    out = tmp_path / "ft"
    args = ["submit", "finetune", *LOCAL, "--data", str(labeled), "--settings", "direct", "--seeds", "42,7",
            "--folds", "1,2,9", "--out", str(out), "--wait", *FINETUNE_FAST]

    first = _memobert(*args, check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "6 of 6 runs in 4 tasks, at most 2 at once" in first.stdout  # folds 1 and 2 train together
    failed = json.loads((out / "slurm/failed.json").read_text())
    assert sorted((t["seed"], t["fold"]) for t in failed) == [(7, 9), (42, 9)]
    assert all("no val samples" in Path(t["log"]).read_text() for t in failed)  # the log named for each says why
    assert "2 of 6 runs failed" in first.stderr and not (out / "results.md").exists()

    write_tiny_shards(labeled, 80, 2, seed=0, speakers=SPEAKERS, class_signal=3.0)  # the data, fixed
    second = _memobert(*args)
    assert "2 of 6 runs in 2 tasks" in second.stdout  # only the failed ones went to Slurm again
    assert not (out / "slurm/failed.json").exists()
    table = (out / "results.md").read_text()
    assert "| Direct |" in table and "folds 1, 2, 9 of 10 (partial)" in table and "seeds 42, 7" in table
    runs = {p.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("fold*.json")}
    assert runs == {f"direct/seed{s}/fold{f}.json" for s in (42, 7) for f in (1, 2, 9)}
    assert [json.loads((out / f"runs/direct/seed7/fold{f}.json").read_text())["trained_with_folds"] for f in (1, 2, 9)] == [
        [1, 2], [1, 2], [9]]
    assert "all 6 runs were done" in _memobert(*args).stdout  # a third submission has nothing to run


@pytest.mark.slow
def test_preprocess_on_a_ray_cluster_over_two_tasks(slurm_cluster, synth_corpus: Path, tmp_path: Path) -> None:
    movies = tmp_path / "movies"
    movies.mkdir()
    for path in (synth_corpus / "movies").glob("movie_000[05].*"):  # two units: one for each Ray node
        (movies / path.name).symlink_to(path)
    tiny = ["--config", str(REPO / "configs/preprocess/tiny_cpu.yaml")]
    out = tmp_path / "out"
    result = _memobert("submit", "preprocess", *LOCAL, "--tasks-per-node", "2", "--input", str(movies), "--out", str(out),
                       *tiny, "--wait", timeout=400)
    manifest = Manifest.load(out)
    assert manifest.num_samples > 0 and f"{manifest.num_samples} samples" in result.stdout
    job_id = json.loads((out / "slurm/job.json").read_text())["job_ids"]["preprocess"]
    logs = _logs(out / "slurm", job_id)
    assert "2 nodes alive" in logs[0]  # the driver saw both tasks' Ray nodes before it started
    assert "starting a Ray node" in logs[1] and "--address=" in logs[1]
    # Each node ran a unit (1 CPU each: the second task in flight cannot fit beside the first).
    nodes = dict(re.findall(r"(movie_000[05]): \d+ utterances from Ray node (\w+)", logs[0]))
    assert set(nodes) == {"movie_0000", "movie_0005"} and len(set(nodes.values())) == 2, logs[0][-3000:]
    # The cluster changes where units run, not what they hold: the shards are a local run's, byte for byte.
    local = tmp_path / "local"
    _memobert("preprocess", "--input", str(movies), "--out", str(local), *tiny, timeout=400)
    assert shard_digests(out) == shard_digests(local) and shard_digests(local)
    # Torn down before the result came back: no process of this Ray cluster is left.
    temp_dir = json.loads((out / f"slurm/ray/{job_id}_0/head.json").read_text())["temp_dir"]  # in every Ray process' args
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if temp_dir.encode() in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended meanwhile
        return b""
