"""Step-time benchmark: our DeepSpeed engine against a plain PyTorch AdamW loop, same model, same batches.

Both loops run the same MEmoBERT flavor, the same four-task mixing, gradient accumulation and
clipping on the same pre-collated batches; the ratio DeepSpeed / plain is the engine's overhead
(goal: within 1.1x). Also prints the padded share of those batches with and without length
bucketing. On a GPU both use bf16 (DeepSpeed's bf16 engine vs torch autocast), on a CPU fp32.

    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --flavor tiny --micro-batch 16 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import write_shards  # noqa: E402  (benchmarks/loader.py: realistic synthetic shards)

from memobert.config import load_config  # noqa: E402
from pretrain.batch import Batch, stage  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.loader import build_loader, padded_share  # noqa: E402
from pretrain.model import MEmoBERT  # noqa: E402
from pretrain.tasks import TaskSampler, build_tasks  # noqa: E402
from pretrain.train import build_optimizer, deepspeed_config, init_distributed, linear_warmup_decay  # noqa: E402
from pretrain.vocab import special_ids  # noqa: E402


def batches(cfg: PretrainConfig, n: int, bucketing: bool, ids) -> list[Batch]:
    cfg.data.bucket_by_length = bucketing
    loader = build_loader(cfg.data.train_shards, cfg.data, batch_size=cfg.train.micro_batch, rank=0, world_size=1,
                          seed=0, cls_id=ids.cls, sep_id=ids.sep)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def run(engine_step, model, data, cfg, device, dtype, steps: int, warmup: int) -> float:
    """Seconds per optimizer step over `steps` steps after `warmup` steps."""
    ids = special_ids(cfg)
    tasks = build_tasks(cfg.mask, ids.mask, ids.random_ids)
    sampler = TaskSampler(cfg.tasks, seed=0)
    gen = torch.Generator().manual_seed(0)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        names = sampler.tasks_for_step(step)
        for micro in range(cfg.train.grad_accum):
            staged = stage(data[(step * cfg.train.grad_accum + micro) % len(data)], device, dtype)
            loss = sum(tasks[name](model, staged, gen).loss for name in names)
            engine_step(loss, last=micro == cfg.train.grad_accum - 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def model_and_optimizer(cfg: PretrainConfig, vocab_size: int, device: torch.device, args: argparse.Namespace
                        ) -> tuple[MEmoBERT, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The same initial weights, AdamW (args.adamw) and schedule for both loops; args.compile compiles the layers."""
    torch.manual_seed(0)
    model = MEmoBERT.from_config(cfg.model, vocab_size=vocab_size).to(device)
    if args.compile:
        model.compile_layers()
    opt = build_optimizer(model, cfg.optim, fused=args.adamw == "fused")
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(10, 100000))


def time_plain_loop(cfg: PretrainConfig, data: list[Batch], device: torch.device, vocab_size: int,
                    args: argparse.Namespace) -> float:
    """Seconds per step of plain PyTorch: fp32 weights, bf16 autocast on GPU, the same optimizer, schedule and
    clipping. A function of its own so that its model and optimizer are freed before DeepSpeed's are built."""
    plain, opt, sched = model_and_optimizer(cfg, vocab_size, device, args)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def plain_step(loss: torch.Tensor, last: bool) -> None:
        (loss / cfg.train.grad_accum).backward()
        if last:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    with autocast:
        return run(plain_step, plain, data, cfg, device, torch.float32, args.steps, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--vocab", default=None, help="vocab folder to record in the shards' manifest")
    parser.add_argument("--compile", action="store_true", help="compile the encoder layers of both models (train.compile)")
    parser.add_argument("--adamw", choices=("fused", "for-loop"), default="fused",
                        help="torch AdamW's implementation in both loops (training builds the fused one)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    tmp = Path(tempfile.mkdtemp())
    write_shards(tmp, args.samples, 4, vocab=args.vocab)
    cfg = load_config(PretrainConfig, overrides=[
        f"model.flavor={args.flavor}", "model.init_from=none", f"data.train_shards={tmp}", "data.num_workers=0",
        f"train.micro_batch={args.micro_batch}", f"train.grad_accum={args.grad_accum}",
        f"train.global_batch={args.micro_batch * args.grad_accum}", "optim.warmup_steps=10", "train.steps=100000",
        f"train.precision={'bf16' if use_cuda else 'fp32'}",
    ])
    ids = special_ids(cfg)
    data = batches(cfg, 8, bucketing=True, ids=ids)
    unbucketed = batches(cfg, 8, bucketing=False, ids=ids)
    share = sum(padded_share(b) for b in data) / len(data)
    share_plain = sum(padded_share(b) for b in unbucketed) / len(unbucketed)

    plain_s = time_plain_loop(cfg, data, device, ids.vocab_size, args)

    import deepspeed

    init_distributed()
    model, opt, sched = model_and_optimizer(cfg, ids.vocab_size, device, args)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, bf16=use_cuda))

    def ds_step(loss: torch.Tensor, last: bool) -> None:
        engine.backward(loss)
        engine.step()

    ds_s = run(ds_step, engine, data, cfg, device, dtype, args.steps, args.warmup)
    samples = cfg.train.micro_batch * cfg.train.grad_accum
    print(f"device {torch.cuda.get_device_name() if use_cuda else 'cpu'} ({os.cpu_count()} cores), flavor {args.flavor}, "
          f"micro-batch {args.micro_batch} x accumulation {args.grad_accum}, {'bf16' if use_cuda else 'fp32'}"
          f"{', compiled encoder layers' if args.compile else ''}, {args.adamw} AdamW")
    print(f"plain PyTorch AdamW loop: {plain_s * 1000:8.1f} ms/step  {samples / plain_s:8.1f} samples/s")
    print(f"DeepSpeed engine (ZeRO {cfg.train.zero_stage}): {ds_s * 1000:8.1f} ms/step  {samples / ds_s:8.1f} samples/s")
    print(f"ratio DeepSpeed / plain: {ds_s / plain_s:.3f}")
    print(f"padded share of positions: {share_plain:.1%} without bucketing, {share:.1%} with")


if __name__ == "__main__":
    main()
