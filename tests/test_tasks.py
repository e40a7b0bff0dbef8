"""The four pretraining tasks on a tiny real model: their loss values pinned, they learn, they survive missing
modalities, they mask only their own modality, they mix as the authors'."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from pretrain.batch import stage
from pretrain.config import TASKS, MaskConfig, TaskConfig
from pretrain.masking import IGNORE_INDEX, span_mask, whole_word_mask
from pretrain.tasks import TaskSampler, build_tasks
from tests.test_model import MASK_ID, RANDOM_IDS, VOCAB_SIZE, make_batch, tiny_model  # noqa: F401 (fixture)


def _tasks():
    return build_tasks(MaskConfig(), MASK_ID, RANDOM_IDS)


@pytest.mark.parametrize("name", TASKS)
def test_loss_falls_when_overfitting_one_batch(name: str) -> None:
    model = tiny_model()
    task = _tasks()[name]
    batch = make_batch([(6, 20, 30), (9, 16, 24), (4, 24, 40), (7, 18, 22)], seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = task(model, stage(batch), torch.Generator().manual_seed(0))  # the same masks every step
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.num_targets > 0
    # Random frame targets: the 3 frames of a span start with near-identical inputs, so the model
    # first fits the span mean (2/3 of the variance) and only later separates them; ask less of it.
    drop = 0.5 if name == "wwmlm" else 0.8
    assert losses[-1] < drop * losses[0], losses[::10]


def test_wwmlm_targets_and_accuracy() -> None:
    model = tiny_model()
    batch = make_batch([(6, 4, 4), (3, 0, 0)], seed=2)
    out = _tasks()["wwmlm"](model, stage(batch), torch.Generator().manual_seed(3))
    _, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, torch.Generator().manual_seed(3))
    assert out.num_targets == int((labels != IGNORE_INDEX).sum()) > 0
    assert 0 <= int(out.metrics["correct"]) <= out.num_targets
    assert abs(out.loss.item() - torch.log(torch.tensor(float(VOCAB_SIZE))).item()) < 1.5  # untrained: ~uniform


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("name", "missing"),
    [("spanmvfr", "visual"), ("spanmvfckl", "visual"), ("spanmafr", "acoustic"), ("wwmlm", "text")],
)
def test_samples_without_the_modality_give_no_targets(name: str, missing: str) -> None:
    task = _tasks()[name]

    def shape(present: bool) -> tuple[int, int, int]:
        words, vis, ac = 5, 20, 30
        return (words if present or missing != "text" else 0,
                vis if present or missing != "visual" else 0,
                ac if present or missing != "acoustic" else 0)

    model = tiny_model()
    mixed = make_batch([shape(True), shape(False)], seed=4)
    out = task(model, stage(mixed), torch.Generator().manual_seed(0))
    only_first = task(model, stage(make_batch([shape(True)], seed=4)), torch.Generator().manual_seed(0))
    assert out.num_targets > 0 and torch.isfinite(out.loss)
    assert out.num_targets == only_first.num_targets  # the sample lacking the modality adds none
    out.loss.backward()
    normal = _grads(model)

    model = tiny_model()
    empty = task(model, stage(make_batch([shape(False), shape(False)], seed=4)), torch.Generator().manual_seed(0))
    assert empty.num_targets == 0 and empty.loss.item() == 0.0 and empty.loss.requires_grad
    empty.loss.backward()
    grads = _grads(model)
    # A batch without targets still reaches the same parameters (zero gradients), so ranks stay in sync.
    assert grads.keys() == normal.keys()
    assert all(torch.isfinite(g).all() and not g.any() for g in grads.values())


def test_task_sampler_follows_the_ratios_and_the_seed() -> None:
    sampler = TaskSampler(TaskConfig(), seed=42)
    draws = [sampler.tasks_for_step(s) for s in range(5000)]
    assert all(len(d) == 1 for d in draws)
    counts = Counter(d[0] for d in draws)
    for name, expected in {"wwmlm": 0.4, "spanmvfr": 0.2, "spanmvfckl": 0.2, "spanmafr": 0.2}.items():
        assert abs(counts[name] / 5000 - expected) < 0.025, counts
    again = TaskSampler(TaskConfig(), seed=42)
    assert [again.tasks_for_step(s) for s in range(200)] == draws[:200]  # same seed and step: same task
    other = TaskSampler(TaskConfig(), seed=43)
    assert [other.tasks_for_step(s) for s in range(200)] != draws[:200]


def test_task_sampler_all_mode_and_disabled_tasks() -> None:
    sampler = TaskSampler(TaskConfig(mode="all"), seed=0)
    assert sampler.tasks_for_step(0) == list(TASKS) == sampler.tasks_for_step(7)
    ratios = {"wwmlm": 1.0, "spanmvfr": 0.0, "spanmvfckl": 1.0, "spanmafr": 0.0}
    drawn = {t for s in range(300) for t in TaskSampler(TaskConfig(ratios=ratios), seed=0).tasks_for_step(s)}
    assert drawn == {"wwmlm", "spanmvfckl"}
    # A task missing from the ratios, or at ratio 0, does not run in "all" mode either.
    partial = TaskSampler(TaskConfig(mode="all", ratios={"wwmlm": 1.0, "spanmafr": 0.0, "spanmvfr": 2.0}), seed=0)
    assert partial.tasks_for_step(3) == ["wwmlm", "spanmvfr"]
    with pytest.raises(ValueError, match="^no task has a positive ratio$"):
        TaskSampler(TaskConfig(ratios={"wwmlm": 0.0}), seed=0)


def test_a_training_micro_batch_reads_no_value_from_the_device() -> None:
    # On the meta device every tensor has a shape but no values: any read the host would have to wait
    # for on a GPU (.item(), int(), boolean indexing, a pageable upload) raises here instead.
    model = tiny_model().to("meta")
    staged = stage(make_batch([(6, 20, 30), (4, 16, 24)], seed=5), "meta", torch.float32)
    for name, task in _tasks().items():
        out = task(model, staged, torch.Generator().manual_seed(0))
        out.loss.backward()
        assert out.loss.is_meta and out.num_targets > 0, name
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_compiled_layers_match_eager_with_one_graph_for_every_length() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = tiny_model(), tiny_model()
    compiled.compile_layers()
    # Batches of different sizes and packed lengths: the dynamic graph must serve them all (a batch of
    # one would get a second graph: dynamo specialises sizes 0 and 1).
    for seed, shapes in enumerate([[(6, 20, 30), (4, 16, 24)], [(9, 30, 50), (3, 10, 12), (5, 5, 5)], [(2, 12, 7), (1, 3, 2)]]):
        staged = stage(make_batch(shapes, seed=seed))
        for name, task in _tasks().items():
            a = task(eager, staged, torch.Generator().manual_seed(0)).loss
            b = task(compiled, staged, torch.Generator().manual_seed(0)).loss
            a.backward()
            b.backward()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for (key, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=key)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, all layers, all lengths
    assert [k for k, _ in eager.named_parameters()] == [k for k, _ in compiled.named_parameters()]


def test_frame_targets_keep_the_shards_precision() -> None:
    # The model reads bf16 inputs; its regression and KL targets stay float16 as stored, not bf16-rounded.
    model = tiny_model().to(torch.bfloat16)
    batch = make_batch([(6, 20, 30), (4, 16, 24)], seed=4)
    staged = stage(batch, "cpu", torch.bfloat16)
    assert staged.device.acoustic.dtype == torch.bfloat16
    assert torch.equal(staged.stored.acoustic, batch.acoustic) and torch.equal(staged.stored.vprob, batch.vprob)
    for name in ("spanmafr", "spanmvfr", "spanmvfckl"):
        task = _tasks()[name]
        exact = task(model, staged, torch.Generator().manual_seed(0)).loss
        rounded = task(model, replace(staged, stored=staged.device), torch.Generator().manual_seed(0)).loss
        assert exact != rounded, name  # the targets do come from the float16 copy


# ---- pinned loss values: each task's loss recomputed by hand from the model's outputs -------------------


PINNED_SHAPES = [(6, 12, 20), (4, 9, 15), (3, 7, 11)]
# One sample, one word, two frames per modality: a single target per task (a mean over one, not max(n, 2)).
ONE_TARGET = [(1, 2, 2)]
SHAPES = pytest.mark.parametrize("shapes", [PINNED_SHAPES, ONE_TARGET], ids=["batch", "one_target"])


def _pinned(name: str, shapes: list[tuple[int, int, int]] = PINNED_SHAPES):
    """The task's output on a fixed batch, and the (untouched) model, batch and a fresh copy of its generator."""
    model = tiny_model(seed=3)
    batch = make_batch(shapes, seed=11)
    out = _tasks()[name](model, stage(batch), torch.Generator().manual_seed(5))
    assert shapes != ONE_TARGET or out.num_targets == 1
    return out, model, batch, torch.Generator().manual_seed(5)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


@SHAPES
def test_wwmlm_loss_is_cross_entropy_of_the_original_ids_per_masked_token(shapes: list) -> None:
    out, model, batch, gen = _pinned("wwmlm", shapes)
    ids, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.15, MASK_ID, RANDOM_IDS, gen)
    masked = labels != IGNORE_INDEX
    if shapes == PINNED_SHAPES:
        assert (ids[masked] != batch.text_ids[masked]).any()  # the input really is corrupted at the targets
    with torch.no_grad():
        logits = model.cls(model(stage(batch).device, text_ids=ids).text)[masked].double().numpy()
    originals = batch.text_ids[masked].numpy()
    expected = -_log_softmax(logits)[np.arange(len(originals)), originals].mean()
    assert out.num_targets == len(originals)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["correct"].item() == int((logits.argmax(1) == originals).sum())


@pytest.mark.parametrize(("name", "modality", "ratio"), [("spanmvfr", "visual", 0.2), ("spanmafr", "acoustic", 0.15)])
@SHAPES
def test_frame_regression_loss_is_the_mse_per_masked_frame_and_dimension(
    name: str, modality: str, ratio: float, shapes: list
) -> None:
    out, model, batch, gen = _pinned(name, shapes)
    valid = getattr(batch, f"{modality}_mask")
    masked = span_mask(valid.sum(1), ratio, 3, gen, max_len=valid.shape[1])
    with torch.no_grad():
        hidden = getattr(model(stage(batch).device, **{f"{modality}_masked": masked}), modality)[masked]
        embed, head = getattr(model, f"{modality}_embed"), getattr(model, f"{modality}_head")
        pred = head(hidden, embed.proj.weight).double().numpy()
    original = getattr(batch, modality)[masked].double().numpy()  # the features before masking zeroed them
    expected = ((pred - original) ** 2).mean()  # over masked frames x feature dims
    assert out.num_targets == int(masked.sum()) > 0
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@SHAPES
def test_spanmvfckl_loss_is_kl_target_to_prediction_per_masked_frame_and_class(shapes: list) -> None:
    out, model, batch, gen = _pinned("spanmvfckl", shapes)
    masked = span_mask(batch.visual_mask.sum(1), 0.2, 3, gen, max_len=batch.visual_mask.shape[1])
    with torch.no_grad():
        logits = model.fer_head(model(stage(batch).device, visual_masked=masked).visual[masked]).double().numpy()
    log_pred = _log_softmax(logits)
    target = batch.vprob[masked].double().numpy()
    target /= target.sum(1, keepdims=True)  # float16 storage: renormalised
    terms = target * (np.log(target) - log_pred)  # KL(target || predicted), per frame and class
    assert out.num_targets == target.shape[0] > 0
    assert out.loss.item() == pytest.approx(terms.mean(), rel=1e-6)  # / (frames x 8), the authors' training loss
    assert out.metrics["kl_sum"].item() == pytest.approx(terms.sum(), rel=1e-6)
    assert out.metrics["correct"].item() == int((log_pred.argmax(1) == target.argmax(1)).sum())


class _Recorder(torch.nn.Module):
    """Runs the real model and keeps the keyword arguments of each call (which inputs a task masked)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.model(*args, **kwargs)


def test_every_task_is_named_by_its_key() -> None:
    # The Task protocol's `name`; the training loop keys tasks by the dict, so only this test reads it.
    assert {key: task.name for key, task in _tasks().items()} == {name: name for name in TASKS}


def test_each_task_masks_only_its_own_modality_with_its_own_ratio() -> None:
    # Ratios far apart, so a task reading another's ratio would mask a different number of frames.
    cfg = MaskConfig(word_mask_prob=0.5, visual_mask_ratio=0.3, acoustic_mask_ratio=0.6)
    batch = make_batch([(8, 30, 30), (6, 24, 24)], seed=12)
    modalities = {"wwmlm": "text", "spanmvfr": "visual", "spanmvfckl": "visual", "spanmafr": "acoustic"}
    for name, task in build_tasks(cfg, MASK_ID, RANDOM_IDS).items():
        model = _Recorder(tiny_model())
        out = task(model, stage(batch), torch.Generator().manual_seed(7))
        (call,) = model.calls
        own = modalities[name]
        masked_inputs = {key for key in ("text_ids", "visual_masked", "acoustic_masked") if key in call}
        assert masked_inputs == {"text_ids" if own == "text" else f"{own}_masked"}, name
        gen = torch.Generator().manual_seed(7)
        if own == "text":
            _, labels = whole_word_mask(batch.text_ids, batch.word_ids, 0.5, MASK_ID, RANDOM_IDS, gen)
            expected = int((labels != IGNORE_INDEX).sum())
            assert expected > 0.35 * int((batch.word_ids >= 0).sum())  # 0.5 of the words, not 0.15
        else:
            ratio = cfg.visual_mask_ratio if own == "visual" else cfg.acoustic_mask_ratio
            other = cfg.acoustic_mask_ratio if own == "visual" else cfg.visual_mask_ratio
            valid = getattr(batch, f"{own}_mask")
            expected = int(span_mask(valid.sum(1), ratio, cfg.span, gen, max_len=valid.shape[1]).sum())
            wrong = span_mask(valid.sum(1), other, cfg.span, torch.Generator().manual_seed(7), max_len=valid.shape[1])
            assert int(wrong.sum()) != expected  # the other ratio would be seen
            assert not (call[f"{own}_masked"] & ~valid).any()  # only real frames
        assert out.num_targets == expected, name
