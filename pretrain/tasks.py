"""The four pretraining tasks (WWMLM, SpanMVFR, SpanMVFC-KL, SpanMAFR) and the authors' task mixing.

Each task masks only its own modality (the others stay intact), runs the model, and returns the
mean loss over its targets. Losses are sum / max(targets, 1): a micro-batch without targets gives
an exact zero that still flows through the same parameters as a normal step, so data-parallel
ranks produce gradients for the same parameter set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.batch import Batch
from pretrain.config import TASKS, MaskConfig, TaskConfig
from pretrain.masking import IGNORE_INDEX, span_mask, whole_word_mask


@dataclass
class TaskOutput:
    """A task's loss (mean over its targets), how many targets it had, and float metrics for logging."""

    loss: Tensor
    num_targets: int
    metrics: dict[str, float] = field(default_factory=dict)


class Task(Protocol):
    """Masks its modality in `batch` with `generator`, runs `model`, returns the loss over its targets."""

    name: str

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> TaskOutput: ...


class WWMLM:
    """Whole-word masked language modelling: cross-entropy over the vocabulary at masked tokens."""

    name = "wwmlm"

    def __init__(self, prob: float, mask_id: int, vocab_size: int) -> None:
        self.prob, self.mask_id, self.vocab_size = prob, mask_id, vocab_size

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> TaskOutput:
        ids, labels = whole_word_mask(batch.text_ids, batch.word_ids, self.prob, self.mask_id, self.vocab_size, generator)
        select = labels != IGNORE_INDEX
        logits = model(batch, text_ids=ids, head="mlm", select=select).float()
        targets = labels[select]
        n = targets.numel()
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(n, 1)
        return TaskOutput(loss, n, _accuracy(logits.argmax(-1) == targets))


class SpanFrameRegression:
    """SpanMVFR / SpanMAFR: MSE between predicted and original raw features at span-masked frames."""

    def __init__(self, name: str, modality: Literal["visual", "acoustic"], ratio: float, span: int) -> None:
        self.name, self.modality, self.ratio, self.span = name, modality, ratio, span

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> TaskOutput:
        frames, valid = getattr(batch, self.modality), getattr(batch, f"{self.modality}_mask")
        masked = span_mask(valid.sum(1), self.ratio, self.span, generator, max_len=valid.shape[1])
        pred = model(batch, head=self.modality, select=masked, **{f"{self.modality}_masked": masked}).float()
        target = frames[masked].float()
        n = target.shape[0]
        # Mean over frames of the per-frame mean squared error (= mean over all masked elements).
        loss = (pred - target).pow(2).sum() / (max(n, 1) * frames.shape[-1])
        return TaskOutput(loss, n)


class SpanMVFCKL:
    """SpanMVFC-KL: KL(FER+ softmax target || predicted distribution) at span-masked visual frames."""

    name = "spanmvfckl"

    def __init__(self, ratio: float, span: int) -> None:
        self.ratio, self.span = ratio, span

    def __call__(self, model: nn.Module, batch: Batch, generator: torch.Generator) -> TaskOutput:
        valid = batch.visual_mask
        masked = span_mask(valid.sum(1), self.ratio, self.span, generator, max_len=valid.shape[1])
        log_pred = F.log_softmax(model(batch, visual_masked=masked, head="fer", select=masked).float(), dim=-1)
        target = batch.vprob[masked].float()
        # vprob is stored in float16: renormalise so the target is an exact distribution.
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        n = target.shape[0]
        # KL summed over classes, averaged over frames (the authors' validation loss; their training
        # loop averages over classes too, i.e. this / vprob_dim).
        loss = F.kl_div(log_pred, target, reduction="sum") / max(n, 1)
        return TaskOutput(loss, n, _accuracy(log_pred.argmax(-1) == target.argmax(-1)))


def _accuracy(hits: Tensor) -> dict[str, float]:
    """`correct` (a count, to sum over micro-batches and ranks) and `acc` (this micro-batch's fraction)."""
    correct = float(hits.sum())
    return {"correct": correct, "acc": correct / max(hits.numel(), 1)}


def build_tasks(mask_cfg: MaskConfig, mask_id: int, vocab_size: int) -> dict[str, Task]:
    """All four tasks by name (pretrain.config.TASKS), configured from the MaskConfig."""
    tasks: dict[str, Task] = {
        "wwmlm": WWMLM(mask_cfg.word_mask_prob, mask_id, vocab_size),
        "spanmvfr": SpanFrameRegression("spanmvfr", "visual", mask_cfg.visual_mask_ratio, mask_cfg.span),
        "spanmvfckl": SpanMVFCKL(mask_cfg.visual_mask_ratio, mask_cfg.span),
        "spanmafr": SpanFrameRegression("spanmafr", "acoustic", mask_cfg.acoustic_mask_ratio, mask_cfg.span),
    }
    assert tuple(tasks) == TASKS
    return tasks


def run_task(
    name: str, model: nn.Module, batch: Batch, mask_cfg: MaskConfig, generator: torch.Generator, *, mask_id: int
) -> TaskOutput:
    """Run one task by name on a micro-batch; `model` is the bare MEmoBERT (its vocab size feeds WWMLM)."""
    return build_tasks(mask_cfg, mask_id, model.config.vocab_size)[name](model, batch, generator)


class TaskSampler:
    """Which tasks an optimizer step trains: one drawn by ratio (the authors' mixing) or all of them.

    The draw for step s depends only on (seed, s): every rank and every accumulation micro-batch of
    the step agree without communication, and a resumed run continues the same sequence.
    Tasks with ratio 0 (or missing from the ratios) never run.
    """

    def __init__(self, cfg: TaskConfig, seed: int) -> None:
        self.mode = cfg.mode
        self.seed = seed
        self.names = [name for name in TASKS if cfg.ratios.get(name, 0.0) > 0]
        self.weights = [cfg.ratios[name] for name in self.names]
        if not self.names:
            raise ValueError("no task has a positive ratio")

    def tasks_for_step(self, step: int) -> list[str]:
        """The task names every micro-batch of optimizer step `step` runs (losses summed when several)."""
        if self.mode == "all":
            return list(self.names)
        rng = random.Random(f"{self.seed}:{step}")  # str seeds hash with SHA-512: stable across processes
        return rng.choices(self.names, weights=self.weights)
