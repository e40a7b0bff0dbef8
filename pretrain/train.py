"""The pretraining loop: one DeepSpeed engine, one task per optimizer step, read top to bottom.

Runs the same under `deepspeed`, `torchrun`, submitit or a single process. Determinism without
saved RNG state: the task of a step, the masks and dropout of a micro-batch are all seeded from
(seed, rank, position), so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from memobert.config import ConfigError, to_dict
from pretrain.batch import Batch, stage
from pretrain.config import OptimConfig, PretrainConfig
from pretrain.export import TRAINER_STATE
from pretrain.loader import TimedLoader, build_loader, shard_paths
from pretrain.model import MEmoBERT
from pretrain.tasks import Task, TaskOutput, TaskSampler, build_tasks
from pretrain.vocab import special_ids

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name, for MFU. Unknown devices log no MFU rather than a wrong one.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
# Validation figures beside each task's loss: (task, metric summed over its targets) -> val/<task>_<suffix>.
VAL_FIGURES = {("wwmlm", "correct"): "acc", ("spanmvfckl", "kl_sum"): "kl_per_frame"}


@dataclass
class TrainResult:
    step: int
    stopped_by: str  # "finished" | "stop_at" | "preempted"
    nonfinite_skipped: int
    last_metrics: dict[str, float]
    checkpoint: Path | None


def train(cfg: PretrainConfig) -> TrainResult:
    """Train (or resume) the run in `cfg.train.out_dir` until `cfg.train.steps` or SIGTERM."""
    rank, world_size = init_distributed()
    _check_batch_arithmetic(cfg, world_size)
    _check_shards(cfg)
    use_cuda = torch.cuda.is_available()
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda)
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    import deepspeed

    ids = special_ids(cfg)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = MEmoBERT.from_config(cfg.model, vocab_size=ids.vocab_size)
    if cfg.train.compile:
        model.compile_layers()
    if cfg.train.zero_stage == 3:
        for module, param in model.borrowed_parameters():
            deepspeed.zero.register_external_parameter(module, param)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(cfg.optim.warmup_steps, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, bf16)
    )
    float_dtype = torch.bfloat16 if bf16 else torch.float32
    # Counted after initialize, as the MFU figure counts them (ZeRO-3 has emptied the tensors by now).
    log.info("%s: %d parameters, %d outside lookup tables (the N of MFU's 6N)", cfg.model.flavor,
             model.num_params(), model.num_params(exclude_embeddings=True))

    step, consumed = 0, 0
    resumed = _resume(engine, ckpt_dir, world_size, cfg)
    if resumed is not None:
        step, consumed = resumed["step"], resumed["micro_batches_consumed"]
        log.info("resumed from %s at step %d", ckpt_dir, step)

    rank_loader = functools.partial(build_loader, cfg=cfg.data, batch_size=cfg.train.micro_batch, rank=rank,
                                    world_size=world_size, cls_id=ids.cls, sep_id=ids.sep)
    loader = rank_loader(cfg.data.train_shards, seed=cfg.train.seed, start_step=consumed)
    batches = iter(loader)
    # One pass over this rank's share of the held-out shards, the same batches every time; built now so
    # that a bad validation set fails before training, not val_every steps into it.
    val_loader = None
    if cfg.data.val_shards:
        val_loader = rank_loader(cfg.data.val_shards, seed=cfg.train.seed + 7919, infinite=False)
    sampler = TaskSampler(cfg.tasks, seed=cfg.train.seed)
    task_fns = build_tasks(cfg.mask, ids.mask, ids.random_ids)
    metrics_file = (out_dir / "metrics.jsonl").open("a") if rank == 0 else None
    tensorboard = _tensorboard(out_dir) if rank == 0 else None
    progress = _progress(rank, step, cfg.train.steps)
    preempted = _install_sigterm_flag()
    peak = _peak_flops(use_cuda, bf16)
    profiler = StepProfiler(cfg.train.profile_steps, out_dir / "profile", rank, use_cuda) if cfg.train.profile_steps else None

    # task -> [sum of loss x targets (a device tensor, read at log time), targets]
    window: dict[str, list[Any]] = defaultdict(lambda: [0.0, 0])
    window_samples = window_tokens = 0
    window_wait = 0.0
    window_start = time.perf_counter()
    nonfinite_total = nonfinite_in_a_row = 0
    last_metrics: dict[str, float] = {}
    last_ckpt: Path | None = None

    last_step = cfg.train.steps if cfg.train.stop_at is None else min(cfg.train.steps, cfg.train.stop_at)
    engine.train()
    while step < last_step:
        if profiler:
            profiler.before_step(step)
        tasks = sampler.tasks_for_step(step)
        micro = 0
        while micro < cfg.train.grad_accum:
            batch: Batch = next(batches)
            window_wait += loader.last_wait_s
            consumed += 1
            torch.manual_seed(_seed(cfg.train.seed, rank, consumed))  # dropout of this micro-batch
            masks = torch.Generator().manual_seed(_seed(cfg.train.seed + 1, rank, consumed))
            staged = stage(batch, engine.device, float_dtype)
            # Through the engine, not engine.module: ZeRO-3 accumulates gradients right only over forwards it sees.
            outputs = {name: task_fns[name](engine, staged, masks) for name in tasks}
            loss = sum(out.loss for out in outputs.values())
            # The step's one host-device sync: a non-finite loss must be known before backward.
            if not _finite_on_all_ranks(loss):
                # Drop this micro-batch on every rank before backward, so DeepSpeed's accumulation
                # counters stay in step; the next micro-batch takes its place.
                nonfinite_total += 1
                nonfinite_in_a_row += 1
                log.warning("non-finite loss at step %d (%s); micro-batch skipped", step, ",".join(tasks))
                if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: stopping "
                        f"(train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}); "
                        f"last good checkpoint: {last_ckpt or 'none'}"
                    )
                continue
            nonfinite_in_a_row = 0
            engine.backward(loss)
            engine.step()
            micro += 1
            _accumulate(window, outputs)
            window_samples += batch.size
            window_tokens += staged.num_positions
        step += 1
        progress.update(1)
        if profiler and (profiled := profiler.after_step(step)) and rank == 0:
            _emit({"step": step, **profiled}, metrics_file, tensorboard, progress, step)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            mean_len = window_tokens / max(window_samples, 1)
            last_metrics = _window_metrics(window, window_samples * world_size, window_tokens * world_size, elapsed)
            last_metrics.update(
                step=step,
                lr=scheduler.get_last_lr()[0],
                data_wait_pct=100.0 * window_wait / max(elapsed, 1e-9),
                nonfinite_skipped=nonfinite_total,
            )
            last_metrics.update(loader.drop_metrics())  # clips the filters dropped on this rank, per reason
            if cfg.data.read.skip_bad_shards:
                last_metrics["skipped_shards"] = loader.skipped_shards
            if use_cuda:
                last_metrics["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if peak:
                last_metrics["mfu"] = model.flops_per_token(mean_len) * last_metrics["tokens_per_s"] / (peak * world_size)
            _emit(last_metrics, metrics_file, tensorboard, progress, step)
            window.clear()
            window_samples = window_tokens = 0
            window_wait = 0.0
            window_start = time.perf_counter()

        if val_loader and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
            val = validate(engine, val_loader, task_fns, cfg, rank, float_dtype)
            _emit({"step": step, **val}, metrics_file, tensorboard, progress, step)
            engine.train()

        # Every rank must agree, or one rank would enter the collective save alone and hang.
        stopping = _any_rank(preempted())
        if step % cfg.train.ckpt_every == 0 or stopping or step == last_step:
            last_ckpt = save_checkpoint(engine, ckpt_dir, step, consumed, world_size, cfg)
        if stopping:
            log.warning("SIGTERM: checkpoint written at step %d, exiting", step)
            break

    progress.close()
    if metrics_file:
        metrics_file.close()
    if tensorboard:
        tensorboard.close()
    return TrainResult(
        step=step,
        stopped_by="finished" if step == cfg.train.steps else ("stop_at" if step == last_step else "preempted"),
        nonfinite_skipped=nonfinite_total,
        last_metrics=last_metrics,
        checkpoint=last_ckpt,
    )


class StepProfiler:
    """torch.profiler over optimizer steps [first, last): a Chrome trace per rank, the top ops, the device's busy share."""

    def __init__(self, steps: tuple[int, int], folder: Path, rank: int, use_cuda: bool) -> None:
        self.first, self.last = steps
        self.folder, self.rank, self.use_cuda = folder, rank, use_cuda
        self.profile: torch.profiler.profile | None = None
        self.start = 0.0

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.use_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()  # the profiled window starts with an idle device
        self.profile = torch.profiler.profile(activities=activities)
        self.profile.start()
        self.start = time.perf_counter()

    def after_step(self, step: int) -> dict[str, float] | None:
        """After optimizer step `step` (1-based): at the window's end, stop, write the trace, return figures."""
        if self.profile is None or step != self.last:
            return None
        if self.use_cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        self.profile.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}_steps{self.first}-{self.last}.json"
        self.profile.export_chrome_trace(str(trace))
        averages = self.profile.key_averages()
        sort_by = "self_cuda_time_total" if self.use_cuda else "self_cpu_time_total"
        log.info("profile of steps [%d, %d), trace %s\n%s", self.first, self.last, trace, averages.table(sort_by=sort_by, row_limit=15))
        steps = self.last - self.first
        figures = {"profile/ms_per_step": 1000 * wall / steps}
        if self.use_cuda:
            # Kernel time over wall time: what the step would gain from keeping the device fed.
            device_s = sum(event.self_device_time_total for event in averages) / 1e6
            figures["profile/device_busy_pct"] = 100 * device_s / wall
        self.profile = None
        return figures


@torch.no_grad()
def validate(engine: Any, loader: TimedLoader, task_fns: dict[str, Task], cfg: PretrainConfig, rank: int,
             float_dtype: torch.dtype) -> dict[str, float]:
    """Per-task loss (the training normalisation) over the first val_batches batches of the finite `loader`.

    Also val/wwmlm_acc (masked-token accuracy) and val/spanmvfckl_kl_per_frame (the KL summed over
    classes, averaged over masked frames: vprob_dim x val/spanmvfckl, the figure the authors validate).
    """
    engine.eval()
    # "val/<name>" -> [sum over targets, targets]
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    # Every rank's loader has the same length, so all ranks run the same forwards (ZeRO-3 gathers in each).
    for i, batch in enumerate(itertools.islice(loader, cfg.train.val_batches)):
        staged = stage(batch, engine.device, float_dtype)
        masks = torch.Generator().manual_seed(_seed(cfg.train.seed + 2, rank, i))
        for name, task in task_fns.items():
            out = task(engine, staged, masks)
            figures = {f"val/{name}": float(out.loss) * out.num_targets}
            figures.update({f"val/{name}_{suffix}": float(out.metrics[metric])
                            for (task_name, metric), suffix in VAL_FIGURES.items() if task_name == name})
            for key, value in figures.items():
                sums[key][0] += value
                sums[key][1] += out.num_targets
    keys = sorted(sums)
    totals = torch.tensor([v for key in keys for v in sums[key]], dtype=torch.float64, device=_comm_device())
    if _distributed():
        dist.all_reduce(totals)
    return {key: float(totals[2 * i] / max(totals[2 * i + 1], 1.0)) for i, key in enumerate(keys)}


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int, consumed: int, world_size: int, cfg: PretrainConfig) -> Path:
    """A DeepSpeed checkpoint (all ranks write their part) plus our trainer state beside it."""
    tag = f"step_{step}"
    state = {
        "step": step,
        "micro_batches_consumed": consumed,
        "world_size": world_size,
        "config": to_dict(cfg),
        "bert_config": engine.module.config.to_dict(),  # export rebuilds the model without init_from
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    if engine.global_rank == 0:
        (ckpt_dir / tag / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / tag


def _resume(engine: Any, ckpt_dir: Path, world_size: int, cfg: PretrainConfig) -> dict[str, Any] | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state = json.loads((ckpt_dir / tag / TRAINER_STATE).read_text())
    if state["world_size"] == world_size or cfg.train.zero_stage == 0:
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
        return state
    # ZeRO partitions optimizer state by data-parallel rank: it cannot be re-read on another world size.
    log.warning(
        "checkpoint %s was written by %d ranks, this run has %d: restoring the model weights, step and "
        "schedule only; the AdamW moments start from zero",
        tag,
        state["world_size"],
        world_size,
    )
    engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True)
    engine.lr_scheduler.last_epoch = state["step"] - 1
    engine.lr_scheduler.step()  # sets the learning rate of step `state["step"]`
    # The old ranks' data positions do not map onto the new ones: continue each rank at the same micro-step.
    state["micro_batches_consumed"] = state["step"] * cfg.train.grad_accum
    return state


def deepspeed_config(cfg: PretrainConfig, bf16: bool) -> dict[str, Any]:
    """Our config expressed as DeepSpeed's; the optimizer and schedule are ours (torch AdamW, LambdaLR)."""
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }


def _check_batch_arithmetic(cfg: PretrainConfig, world_size: int) -> None:
    t = cfg.train
    if t.micro_batch * t.grad_accum * world_size != t.global_batch:
        raise ConfigError(
            f"config key 'train.global_batch': {t.global_batch} != train.micro_batch ({t.micro_batch}) x "
            f"train.grad_accum ({t.grad_accum}) x world size ({world_size}) = {t.micro_batch * t.grad_accum * world_size}"
        )


def _check_shards(cfg: PretrainConfig) -> None:
    """The shards exist and hold features of the model's input dims (manifest.json), caught before any work."""
    from memobert.shard_store import folder_manifest

    if not cfg.data.train_shards:
        raise ConfigError("config key 'data.train_shards' is empty: give a shard folder (with manifest.json) or a .tar pattern")
    shard_paths(cfg.data.train_shards)  # raises FileNotFoundError naming what is missing
    folder = cfg.data.train_shards
    manifest = folder_manifest(folder)
    if manifest is None:
        return
    dims = manifest.dims
    for shard_key, cfg_key in (("audio", "acoustic_dim"), ("visual", "visual_dim"), ("vprob", "vprob_dim")):
        if shard_key in dims and dims[shard_key] != getattr(cfg.model, cfg_key):
            raise ConfigError(
                f"config key 'model.{cfg_key}' is {getattr(cfg.model, cfg_key)} but the shards in {folder} "
                f"hold {shard_key} features of dim {dims[shard_key]}"
            )


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes; a bare process becomes a world of one."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, fused: bool = True) -> torch.optim.AdamW:
    """The recipe's AdamW: lr, betas, eps and weight decay from `optim`, no decay on biases and LayerNorms.
    Fused on a CPU as well, where torch's default is the for-loop one (a small kernel per tensor and operation)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=fused)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for names containing "bias" or "LayerNorm" (the authors' rule), nor for
    the LayerNorms our own modules name otherwise (norm, proj_norm, slots of a Sequential).

    Everything else decays, also 1-D parameters such as the frame mask embeddings.
    """
    layer_norms = {f"{owner}.{name}" if owner else name
                   for owner, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
                   for name, _ in module.named_parameters(recurse=False)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = "bias" in name or "LayerNorm" in name or name in layer_norms
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up to 1 over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _seed(base: int, rank: int, position: int) -> int:
    """A 63-bit seed per (base, rank, position), hashed: arithmetic mixes collide across ranks in long runs."""
    digest = hashlib.blake2b(f"{base}/{rank}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).all().float().reshape(1)  # read once, below
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _distributed() -> bool:
    """More than one rank: collectives are needed (a single process skips them and their syncs)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    if not _distributed():
        return flag  # no collective, no upload: a single GPU keeps running ahead
    value = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _accumulate(window: dict[str, list[Any]], outputs: dict[str, TaskOutput]) -> None:
    for name, out in outputs.items():
        window[name][0] = window[name][0] + out.loss.detach().float() * out.num_targets  # stays on the device
        window[name][1] += out.num_targets


def _window_metrics(window: dict[str, list[Any]], samples: int, tokens: int, seconds: float) -> dict[str, float]:
    metrics = {f"loss/{name}": float(s) / n for name, (s, n) in window.items() if n > 0}
    metrics["samples_per_s"] = samples / max(seconds, 1e-9)
    metrics["tokens_per_s"] = tokens / max(seconds, 1e-9)
    return metrics


def _emit(metrics: dict[str, float], jsonl: Any, tensorboard: Any, progress: Any, step: int) -> None:
    if jsonl is not None:
        jsonl.write(json.dumps(metrics) + "\n")
        jsonl.flush()
    if tensorboard is not None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                tensorboard.add_scalar(key, value, step)
    shown = {k.split("/")[-1] if k.startswith("loss/") else k: v for k, v in metrics.items() if k != "step"}
    progress.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if isinstance(v, float)}, refresh=False)
    log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))


def _tensorboard(out_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))


def _progress(rank: int, start: int, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", disable=rank != 0, dynamic_ncols=True)


def _install_sigterm_flag():
    received = {"flag": False}

    def handler(signum: int, frame: Any) -> None:
        received["flag"] = True

    signal.signal(signal.SIGTERM, handler)
    return lambda: received["flag"]


def _peak_flops(use_cuda: bool, bf16: bool) -> float | None:
    if not (use_cuda and bf16):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
