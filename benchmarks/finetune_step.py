"""Finetuning step time on the CPU: torch's AdamW as finetune/run.py builds it, for-loop against fused.

On a CPU torch's AdamW defaults to its for-loop implementation (one small kernel per tensor and
operation); `fused=True` updates every tensor in one vectorised pass. This runs the demo's finetuning
step (batch 16, the demo's utterance lengths and feature dims) for bert_direct (MiniLM, 23M parameters,
12M of them the word embeddings AdamW visits every step) and the tiny flavor, both implementations
interleaved in rounds so that a busy machine slows both alike, and prints ms/step, the ratio, and how far
the two implementations' weights are apart after one step from the same weights (float rounding only).

    .venv/bin/python benchmarks/finetune_step.py --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.data import batches
from finetune.run import optimizer_and_schedule, train_step
from finetune.settings import build_model, schedule_for
from memobert.config import load_config
from memobert.schema import Utterance
from pretrain.batch import Batch
from preprocessing.text import TextTokenizer

DEMO_YAML = "configs/finetune/demo_cpu.yaml"
# The demo's IEMOCAP-layout shards: ~16 tokens, ~19 face frames at 5 fps, ~62 wav2vec2 frames; dims 64 / 24 / 8.
DIMS = {"acoustic_dim": 64, "visual_dim": 24, "vprob_dim": 8}


def demo_batches(cfg: FinetuneConfig, tok: TextTokenizer, n: int, batch_size: int) -> list[Batch]:
    """`n` labeled batches of random utterances at the demo's lengths and dims."""
    rng = np.random.default_rng(0)
    utts = []
    for i in range(n * batch_size):
        words = int(rng.integers(10, 17))
        frames_v, frames_a = int(rng.integers(16, 20)), int(rng.integers(58, 65))
        utts.append(Utterance(
            key=f"u{i}", meta={"label": int(rng.integers(4)), "speaker": "Ses01F"},
            tokens=rng.integers(1000, tok.vocab_size, words), words=np.arange(words),
            audio=rng.standard_normal((frames_a, DIMS["acoustic_dim"])),
            visual=rng.standard_normal((frames_v, DIMS["visual_dim"])),
            vprob=rng.dirichlet(np.ones(DIMS["vprob_dim"]), frames_v)))
    return list(batches(utts, batch_size, cfg.data, tok.cls_id, tok.sep_id))


def train_steps(model: torch.nn.Module, cfg: FinetuneConfig, setting: str, data: list[Batch], fused: bool) -> float:
    """Seconds per step of finetune's train_step (fp32, as on the demo's CPU) over `data`."""
    optimizer, scheduler = optimizer_and_schedule(model, schedule_for(setting, cfg), cfg.train, fused=fused)
    model.train()
    start = time.perf_counter()
    for batch in data:
        train_step(model, batch, optimizer, scheduler, cfg.train.grad_clip, nullcontext())
    return (time.perf_counter() - start) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and implementation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default="bert_direct,direct")
    args = parser.parse_args()

    cfg = load_config(FinetuneConfig, [DEMO_YAML])
    tok = TextTokenizer()
    data = demo_batches(cfg, tok, args.steps, cfg.train.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {cfg.train.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds per implementation")
    for setting in args.settings.split(","):
        torch.manual_seed(0)
        initial = build_model(setting, cfg, DIMS, tok, pretrained=None)
        params = sum(p.numel() for p in initial.parameters())
        models = {"for-loop": copy.deepcopy(initial), "fused": copy.deepcopy(initial)}
        train_steps(copy.deepcopy(initial), cfg, setting, data[:2], fused=False)  # warm-up: allocator, oneDNN
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                torch.manual_seed(1)  # the same dropout masks for both
                times[name].append(train_steps(model, cfg, setting, data, fused=name == "fused"))
        loop, fused = statistics.median(times["for-loop"]), statistics.median(times["fused"])
        print(f"{setting:12s} {params / 1e6:5.1f}M params  for-loop {loop * 1000:7.1f} ms/step  "
              f"fused {fused * 1000:7.1f} ms/step  for-loop/fused {loop / fused:.2f}x  "
              f"max |weight difference| after one step {one_step_apart(initial, cfg, setting, data[0]):.1e}")


def one_step_apart(initial: torch.nn.Module, cfg: FinetuneConfig, setting: str, batch: Batch) -> float:
    """Largest weight difference between the two implementations after one step from the same weights and batch.

    Only one: later steps amplify float rounding through training, as any change of summation order would.
    """
    after = []
    for fused in (False, True):
        model = copy.deepcopy(initial)
        torch.manual_seed(1)
        train_steps(model, cfg, setting, [batch], fused)
        after.append(model)
    return max((a - b).abs().max().item() for a, b in zip(after[0].parameters(), after[1].parameters()))


if __name__ == "__main__":
    main()
