"""The four pretraining tasks (WWMLM, SpanMVFR, SpanMVFC-KL, SpanMAFR) and the authors' task mixing.

Each task masks only its own modality (the others stay intact), runs the model, and returns the
authors' mean loss over its targets: WWMLM per masked token, frame regression per masked frame x
feature dim, SpanMVFC-KL per masked frame x class. Masks and target positions are drawn on the host
copy of the staged micro-batch (pretrain.batch.stage), so a task never waits for a value from the
device. Losses are sum / max(count, 1): a micro-batch without targets gives an exact zero that still
flows through the same parameters as a normal step, so data-parallel ranks produce gradients for the
same parameter set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.batch import Staged, at_positions, flat_positions
from pretrain.config import TASKS, MaskConfig, TaskConfig
from pretrain.masking import IGNORE_INDEX, span_mask, whole_word_mask


@dataclass
class TaskOutput:
    """A task's loss (mean over its targets), how many targets it had (a host int), and device-side sums.

    metrics are sums over the targets that stay tensors on the device (e.g. "correct": right
    predictions), so a training step never waits for them; divided by num_targets when logged.
    """

    loss: Tensor
    num_targets: int
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Task(Protocol):
    """Masks its modality on the host copy of `staged` with `generator`, runs `model`, returns the loss over its targets."""

    name: str

    def __call__(self, model: nn.Module, staged: Staged, generator: torch.Generator) -> TaskOutput: ...


class WWMLM:
    """Whole-word masked language modelling: cross-entropy over the vocabulary at masked tokens."""

    name = "wwmlm"

    def __init__(self, prob: float, mask_id: int, random_ids: tuple[int, int]) -> None:
        self.prob, self.mask_id, self.random_ids = prob, mask_id, random_ids

    def __call__(self, model: nn.Module, staged: Staged, generator: torch.Generator) -> TaskOutput:
        host = staged.host
        ids, labels = whole_word_mask(host.text_ids, host.word_ids, self.prob, self.mask_id, self.random_ids, generator)
        picked = labels != IGNORE_INDEX
        targets = staged.upload(labels[picked])
        logits = model(
            staged.device,
            layout=staged.layout,
            text_ids=staged.upload(ids),
            head="mlm",
            positions=staged.upload(flat_positions(picked)),
        ).float()
        n = targets.numel()
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(n, 1)
        return TaskOutput(loss, n, {"correct": (logits.argmax(-1) == targets).sum()})


class SpanFrameRegression:
    """SpanMVFR / SpanMAFR: MSE between predicted and original raw features at span-masked frames."""

    def __init__(self, name: str, modality: Literal["visual", "acoustic"], ratio: float, span: int) -> None:
        self.name, self.modality, self.ratio, self.span = name, modality, ratio, span

    def __call__(self, model: nn.Module, staged: Staged, generator: torch.Generator) -> TaskOutput:
        masked, positions = _span_positions(staged, self.modality, self.ratio, self.span, generator)
        pred = model(
            staged.device,
            layout=staged.layout,
            head=self.modality,
            positions=positions,
            **{f"{self.modality}_masked": masked},
        ).float()
        frames = getattr(staged.stored, self.modality)
        target = at_positions(frames, positions).float()
        n = positions.numel()
        # Mean over frames of the per-frame mean squared error (= mean over all masked elements).
        loss = (pred - target).pow(2).sum() / (max(n, 1) * frames.shape[-1])
        return TaskOutput(loss, n)


class SpanMVFCKL:
    """SpanMVFC-KL: KL(FER+ softmax target || predicted distribution) at span-masked visual frames."""

    name = "spanmvfckl"

    def __init__(self, ratio: float, span: int) -> None:
        self.ratio, self.span = ratio, span

    def __call__(self, model: nn.Module, staged: Staged, generator: torch.Generator) -> TaskOutput:
        masked, positions = _span_positions(staged, "visual", self.ratio, self.span, generator)
        logits = model(staged.device, layout=staged.layout, visual_masked=masked, head="fer", positions=positions)
        log_pred = F.log_softmax(logits.float(), dim=-1)
        target = at_positions(staged.stored.vprob, positions).float()
        # float16 storage leaves the probabilities summing to 1 only within ~1e-3: renormalise.
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
        n = positions.numel()
        kl = F.kl_div(log_pred, target, reduction="sum")
        # The authors' training loss: the KL terms averaged over masked frames x classes. The per-frame
        # KL (summed over classes) is vprob_dim times larger; it is kept as the metric "kl_sum".
        loss = kl / (max(n, 1) * target.shape[-1])
        metrics = {"correct": (log_pred.argmax(-1) == target.argmax(-1)).sum(), "kl_sum": kl.detach()}
        return TaskOutput(loss, n, metrics)


def _span_positions(
    staged: Staged, modality: str, ratio: float, span: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Span mask of `modality`'s frames drawn on the host: (bool [B, Lm], flat positions [N]), both on the device."""
    valid = getattr(staged.host, f"{modality}_mask")
    masked = span_mask(valid.sum(1), ratio, span, generator, max_len=valid.shape[1])
    return staged.upload(masked), staged.upload(flat_positions(masked))


def build_tasks(mask_cfg: MaskConfig, mask_id: int, random_ids: tuple[int, int]) -> dict[str, Task]:
    """All four tasks by name (pretrain.config.TASKS); WWMLM draws random replacements from ids [low, high)."""
    tasks: dict[str, Task] = {
        "wwmlm": WWMLM(mask_cfg.word_mask_prob, mask_id, random_ids),
        "spanmvfr": SpanFrameRegression("spanmvfr", "visual", mask_cfg.visual_mask_ratio, mask_cfg.span),
        "spanmvfckl": SpanMVFCKL(mask_cfg.visual_mask_ratio, mask_cfg.span),
        "spanmafr": SpanFrameRegression("spanmafr", "acoustic", mask_cfg.acoustic_mask_ratio, mask_cfg.span),
    }
    assert tuple(tasks) == TASKS
    return tasks


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
