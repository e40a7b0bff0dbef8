"""`memobert preprocess` end to end: a real local Ray, real MTCNN and decoders, tiny random encoders.

Each run is a subprocess, as users run it, on a few videos of the synthetic corpus (every video
costs seconds of face detection on 2 cores). The pipeline's pure parts (unit discovery, actor
resources, failure classification) are checked directly, without Ray or media.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from helpers import shard_digests
from memobert.schema import Manifest
from preprocessing.adapters import CorpusError, load_iemocap
from preprocessing.config import PreprocessConfig, RayConfig
from preprocessing.pipeline import detection_task_options, discover_units, encoder_actor_options, is_ray_system_error
from preprocessing.shards import read_utterances
from preprocessing.subtitles import SubtitleError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs/preprocess/tiny_cpu.yaml")]
# A sidecar .srt and an embedded subtitle stream, and two more so that a kill after the first finished
# unit still finds work in flight (a unit takes a few seconds on the fast face path).
MOVIES = ("movie_0000", "movie_0005", "movie_0001", "movie_0002")


def _link_movies(corpus: Path, folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        for path in (corpus / "movies").glob(f"{name}.*"):
            (folder / path.name).symlink_to(path)
    return folder


def _preprocess(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "memobert.cli", "preprocess", "--input", str(source), "--out", str(out), *TINY, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _samples(out: Path) -> list:
    manifest = Manifest.load(out)
    return [u for shard in manifest.shard_paths(out) for u in read_utterances(Path(shard))]


@pytest.fixture(scope="module")
def movies(synth_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prep_movies")
    source = _link_movies(synth_corpus, root / "movies", MOVIES)
    _preprocess(source, root / "out")
    return {"source": source, "out": root / "out"}


@pytest.mark.slow
def test_movies_schema_counts_and_active_speaker(movies: dict[str, Path], synth_corpus: Path) -> None:
    manifest = Manifest.load(movies["out"])
    assert manifest.dims == {"audio": 64, "visual": 24, "vprob": 8}  # the tiny encoders' widths
    assert manifest.extractors["text"]["vocab"] and manifest.extractors["audio"]["sha256"]
    samples = _samples(movies["out"])
    assert len({u.key for u in samples}) == len(samples) == manifest.num_samples
    # Unit order is the keys' order; the shards hold one permutation of it, seeded by the config's seed (0).
    keys = [u.key for u in samples]
    assert manifest.settings["pack"] == {"shuffled": True, "seed": 0}
    assert keys == [sorted(keys)[i] for i in np.random.default_rng(0).permutation(len(keys))]

    truth = {name: json.loads((synth_corpus / "ground_truth/movies" / f"{name}.json").read_text()) for name in MOVIES}
    kept = {f"{name}_{i:04d}": cue for name, gt in truth.items()
            for i, cue in enumerate(c for c in gt["cues"] if c["kept"])}
    assert {u.key for u in samples} <= set(kept)  # nothing invented; only face-less clips may be missing
    assert len(samples) >= 0.9 * len(kept)
    right = 0
    for utt in samples:
        cue = kept[utt.key]
        assert utt.meta["text"] == cue["text"] and utt.meta["start"] == pytest.approx(cue["start"], abs=0.01)
        assert utt.tokens.dtype == np.int32 and len(utt.tokens) == len(utt.words) > 0
        assert utt.audio.dtype == np.float16 and utt.audio.shape[1] == 64
        assert abs(len(utt.audio) - (cue["end"] - cue["start"]) / 0.06) <= 2  # 60 ms pooled frames
        assert 0 < len(utt.visual) <= 36 and utt.visual.shape[1] == 24 and utt.vprob.shape == (len(utt.visual), 8)
        np.testing.assert_allclose(utt.vprob.astype(np.float32).sum(1), 1.0, atol=1e-2)
        right += utt.meta["speaker_track"] == cue["speaker"]  # tracks are numbered left to right
    assert right >= 0.9 * len(samples)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_shards(movies: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "memobert.cli", "preprocess", "--input", str(movies["source"]), "--out", str(out), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "units.jsonl"
    deadline = time.monotonic() + 600
    while not (log.is_file() and log.read_text().count("\n") >= 1):  # one unit finished, others in flight
        assert proc.poll() is None and time.monotonic() < deadline, "preprocess ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = log.read_text().count("\n")
    assert 1 <= done < len(MOVIES)

    rerun = _preprocess(movies["source"], out)
    assert f"{done} already done" in rerun.stderr
    assert shard_digests(out) == shard_digests(movies["out"])  # same keys, same bytes: no duplicate, nothing lost


def _running_unit_worker(driver: int) -> int | None:
    """The pid of a Ray worker of `driver` stopped (SIGSTOP) in the middle of a unit, or None.

    Ray titles a worker with the function it is running (`ray::process_unit`) and `ray::IDLE` between
    tasks. A stopped process cannot finish its task, so a title read after the stop is still true at the kill.
    """
    import psutil

    for child in psutil.Process(driver).children(recursive=True):
        try:
            if child.cmdline()[:1] != ["ray::process_unit"]:
                continue
            child.suspend()
            if child.cmdline()[:1] == ["ray::process_unit"]:
                return child.pid
            child.resume()
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_a_killed_task_worker_leaves_no_manifest_and_the_rerun_completes(movies: dict[str, Path], tmp_path: Path) -> None:
    """Ray's failure path with a real fault: a worker SIGKILLed mid-unit fails that unit as Ray's fault, not its own."""
    out, stderr = tmp_path / "out", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "memobert.cli", "preprocess", "--input", str(movies["source"]), "--out", str(out), *TINY]
    with stderr.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    log = out / "units.jsonl"
    deadline = time.monotonic() + 600
    while not (log.is_file() and log.read_text().count("\n") >= 1):  # one unit finished: others are in flight
        assert proc.poll() is None and time.monotonic() < deadline, "preprocess ended before a unit finished"
        time.sleep(0.2)
    while (worker := _running_unit_worker(proc.pid)) is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no unit was in flight to kill"
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    try:
        assert proc.wait(timeout=600) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    assert not (out / "manifest.json").exists()  # the output is incomplete until a rerun
    message = re.search(r"(\d+) unit\(s\) hit a Ray failure .* were not recorded: ([^.]+)\.", stderr.read_text())
    assert message, stderr.read_text()[-3000:]
    named = set(message.group(2).split(", "))
    done = {json.loads(line)["unit"] for line in log.read_text().splitlines()}
    assert named and named == set(MOVIES) - done and int(message.group(1)) == len(named)
    assert not (out / "failures.jsonl").exists()  # Ray's fault is not recorded against the unit

    rerun = _preprocess(movies["source"], out)
    assert f"{len(done)} already done, {len(named)} to process" in rerun.stderr
    assert set(re.findall(r"(movie_\d+): \d+ utterances from Ray node", rerun.stderr)) == named
    assert shard_digests(out) == shard_digests(movies["out"])  # the rerun processed exactly the named units


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", *args], check=True)


@pytest.mark.slow
def test_bad_inputs_are_recorded_and_the_good_ones_processed(synth_corpus: Path, tmp_path: Path) -> None:
    src = tmp_path / "videos"
    _link_movies(synth_corpus, src, ("movie_0002",))
    good = synth_corpus / "movies" / "movie_0002.mp4"
    subs = (synth_corpus / "movies" / "movie_0002.srt").read_text()
    cues = subs.split("\n\n")
    (src / "movie_0002.srt").unlink()  # the good video's subtitles, with one broken timing line
    (src / "movie_0002.srt").write_text("\n\n".join([cues[0], cues[1].replace("-->", "->"), *cues[2:]]))
    (src / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (src / "zero.mp4").write_bytes(b"")
    _ffmpeg("-i", str(good), "-an", "-c:v", "copy", str(src / "silent.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=320x240:d=6:r=25", "-f", "lavfi", "-i", "sine=f=220:d=6",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src / "faceless.mp4"))
    shutil.copy(good, src / "empty_subs.mp4")
    shutil.copy(good, src / "garbage_subs.mp4")
    shutil.copy(good, src / "broken_subs.mp4")
    for name in ("truncated", "zero", "silent", "faceless"):
        (src / f"{name}.srt").write_text(subs)
    (src / "empty_subs.srt").write_text("")
    (src / "garbage_subs.srt").write_text("this is not\na subtitle file\n")
    (src / "broken_subs.srt").write_text(subs.replace("-->", "->"))

    out = tmp_path / "out"
    _preprocess(src, out)
    failures = {json.loads(line)["unit"]: json.loads(line)["reason"] for line in (out / "failures.jsonl").read_text().splitlines()}
    assert set(failures) == {"truncated", "zero", "silent", "faceless", "empty_subs", "garbage_subs", "broken_subs"}
    assert "zero.mp4" in failures["zero"] and "truncated.mp4" in failures["truncated"]
    assert "audio" in failures["silent"] and "no_face" in failures["faceless"]
    assert "empty_subs" in failures["empty_subs"] and "garbage_subs.srt" in failures["garbage_subs"]
    assert f"broken_subs.srt: no readable cue, {len(cues)} malformed" in failures["broken_subs"]
    records = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert [r["dropped"]["skipped_malformed_cue"] for r in records if r["unit"] == "movie_0002"] == [1]
    assert {u.key.rsplit("_", 1)[0] for u in _samples(out)} == {"movie_0002"}


@pytest.mark.slow
def test_labeled_iemocap_session(synth_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "iemocap"
    root.mkdir()
    (root / "Session1").symlink_to(synth_corpus / "iemocap" / "Session1")
    segments, _ = load_iemocap(root)
    out = tmp_path / "out"
    _preprocess(root, out, "--config", str(REPO / "configs/preprocess/labeled.yaml"))
    samples = {u.key: u for u in _samples(out)}
    assert set(samples) == {s.key for s in segments}  # labeled corpora keep every utterance
    assert Manifest.load(out).settings["pack"] == {"shuffled": False, "seed": None}  # and their unit order
    for seg in segments:
        meta = samples[seg.key].meta
        assert (meta["label"], meta["speaker"], meta["session"], meta["text"]) == (seg.label, seg.speaker, 1, seg.text)
    assert sum(len(u.visual) > 0 for u in samples.values()) >= 0.8 * len(samples)  # both actors on screen


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.mark.parametrize(("first", "second"), [("a/b.mp4", "a_b.mp4"), ("a.mp4", "a.mkv"), ("羅生門.mp4", "七人侍.mkv")])
def test_videos_with_one_unit_name_fail_before_any_work(tmp_path: Path, first: str, second: str) -> None:
    _touch(tmp_path / first, tmp_path / second)
    with pytest.raises(ValueError, match="both get the unit name") as info:
        discover_units(tmp_path, PreprocessConfig())
    assert str(tmp_path / first) in str(info.value) and str(tmp_path / second) in str(info.value)


def test_unit_names_of_distinct_videos_stay_as_before(tmp_path: Path) -> None:
    _touch(tmp_path / "a/b.mp4", tmp_path / "c.d.mkv", tmp_path / "羅生門.mp4")
    units, _ = discover_units(tmp_path, PreprocessConfig())
    assert [u.name for u in units] == ["a_b", "c_d", "___"]  # what earlier runs recorded: they still resume


def test_csv_rows_with_one_unit_name_fail_naming_the_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "lists" / "set.csv"
    _touch(tmp_path / "x/u1.wav", tmp_path / "y/u1.wav", csv_path)
    csv_path.write_text(f"path,start,end,label\n{tmp_path}/x/u1.wav,0,1,ang\n{tmp_path}/y/u1.wav,0,1,sad\n")
    message = f"{csv_path}: {tmp_path}/x/u1.wav and {tmp_path}/y/u1.wav both get the unit name 'u1'"
    with pytest.raises(ValueError, match=re.escape(message)):
        discover_units(csv_path, PreprocessConfig())


def test_a_broken_labeled_corpus_is_not_read_as_plain_videos(tmp_path: Path) -> None:
    name = "MSP-IMPROV-S01A-F01-S-FM01"
    (tmp_path / "Evaluation.txt").write_text(f"{name.replace('MSP', 'UTD')}.avi; A; A:3.0; V:2.5; D:3.0; N:5.0;\n")
    _touch(tmp_path / "Video" / f"{name}.avi")  # no transcripts: the loader's error must reach the user
    with pytest.raises(CorpusError, match="no transcripts"):
        discover_units(tmp_path, PreprocessConfig())


@pytest.mark.parametrize(("gpus", "audio", "visual", "share"),
                         [(1, 1, 1, 0.5), (8, 1, 1, 1.0), (1, 2, 1, 0.3333), (2, 2, 1, 0.5), (4, 4, 4, 0.5)])
def test_encoder_actors_share_the_gpus_so_all_of_them_start(gpus: int, audio: int, visual: int, share: float) -> None:
    options = encoder_actor_options(gpus, RayConfig(audio_actors=audio, visual_actors=visual))
    assert options["num_gpus"] == share and options["num_cpus"] == 1
    assert gpus * int(1 / share) >= audio + visual  # Ray packs floor(1 / share) actors on each GPU
    assert options["max_restarts"] > 0 and options["max_task_retries"] > 0
    cpu = encoder_actor_options(0, RayConfig(cpus_per_actor=0.5))
    assert "num_gpus" not in cpu and cpu["num_cpus"] == 0.5 and cpu["max_restarts"] > 0


@pytest.mark.parametrize(("gpus", "cpus", "task_share"), [(1, 16, 0.0125), (2, 16, 0.025), (1, 2, 0.1), (4, 6, 0.1)])
def test_detection_tasks_and_encoder_actors_fit_on_the_gpus_together(gpus: int, cpus: int, task_share: float) -> None:
    cfg = PreprocessConfig()
    cfg.face.detector = "mtcnn"  # a GPU path with what is installed here (torch); CenterFace's needs onnxruntime-gpu
    task = detection_task_options(gpus, cpus, cfg)
    assert task == {"num_cpus": 1, "num_gpus": task_share}
    actors = encoder_actor_options(gpus, cfg.ray, reserved=cfg.ray.detection_gpu_share)
    per_gpu = -(-(cfg.ray.audio_actors + cfg.ray.visual_actors) // gpus)
    assert per_gpu * actors["num_gpus"] + -(-cpus // gpus) * task["num_gpus"] <= 1.0 + 1e-9  # one task per CPU and every actor fit


def test_detection_tasks_ask_for_no_gpu_when_they_could_not_use_one() -> None:
    from preprocessing.detectors import onnx_cuda_available

    cfg = PreprocessConfig()
    assert detection_task_options(0, 16, cfg) == {"num_cpus": 1}  # a CPU cluster
    cfg.face.detector = "mtcnn"
    cfg.face.device = "cpu"
    assert detection_task_options(1, 16, cfg) == {"num_cpus": 1}
    cfg.face.detector, cfg.face.device = "centerface", "auto"
    assert ("num_gpus" in detection_task_options(1, 16, cfg)) == onnx_cuda_available()  # False with the CPU onnxruntime


@pytest.mark.slow
def test_face_device_auto_follows_the_gpu_ray_assigned_to_the_task() -> None:
    # No GPU exists on this machine, so Ray is told the node has one: Ray's assignment (what the resolver
    # reads) is real, the GPU is not. Torch in the driver sees none, which is the point: the task decides.
    import ray

    from preprocessing.detectors import resolve_device

    def probe() -> tuple[str, str | None]:
        return resolve_device("auto"), os.environ.get("CUDA_VISIBLE_DEVICES")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        task = ray.remote(probe)
        with_gpu = ray.get(task.options(num_cpus=1, num_gpus=0.1).remote())
        without = ray.get(task.options(num_cpus=1).remote())
    finally:
        ray.shutdown()
    assert with_gpu == ("cuda", "0")
    assert without[0] == "cpu" and not without[1]
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto", cuda_usable=True) == "cuda"


def test_ray_failures_are_not_recorded_as_the_units_fault() -> None:
    import ray.exceptions as rex

    def raised_in_task(cause: BaseException) -> BaseException:  # what ray.get raises for a failed task
        return rex.RayTaskError("process_unit", "Traceback ...", cause).as_instanceof_cause()

    dead_actor = rex.ActorDiedError()
    for err in (dead_actor, rex.WorkerCrashedError(), rex.NodeDiedError("node gone"), rex.ObjectLostError("ab" * 14, None, ""),
                raised_in_task(dead_actor), raised_in_task(raised_in_task(dead_actor))):
        assert is_ray_system_error(err), err
    for err in (ValueError("x.mp4: no decodable audio stream"), raised_in_task(ValueError("x.mp4: no decodable audio")),
                raised_in_task(raised_in_task(SubtitleError("x.srt:3: bad timing")))):
        assert not is_ray_system_error(err), err
