"""The CV driver: every (setting, seed, fold) run, model selection on the validation speaker, then the report.

One run fits what the model fits before training (FitsOnData: the baselines' input statistics, M3ER's
CCA, proxy maps and threshold), trains on the fold's training speakers for a fixed number of steps with
the lr decaying linearly to 0, validates every `train.val_every` steps, stops after `train.patience`
validations without a better validation-speaker UAR, reloads the weights of the best validation and
evaluates the test speaker once, with every input and with each of the 6 other non-empty modality
subsets (the missing-modality table). Each run writes runs/<setting>/seed<k>/fold<n>.json; a rerun
skips the runs whose JSON exists.

Folds that share their training speakers (IEMOCAP's and MSP-IMPROV's pairs: one speaker tests while the
other of the session validates, then they swap) train the same model under the same seed, so a setting
whose fit-time hook reads no validation speaker (all but M3ER) trains once for both: every validation
scores each fold's validation speaker, each fold keeps its own best weights and patience, and training
goes on until the last fold stops. The records are the ones two separate runs write; the trajectory never
depends on a validation, so one fold's test speaker, validating its partner, cannot reach its own selection.

No DeepSpeed downstream: a fold is a few thousand utterances and a BERT-base model fits one device many
times over, so there is nothing to shard or accumulate; a plain loop on one device keeps model selection
(copy the best weights, reload them) trivial and needs no process group per run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finetune.config import (
    BASELINE_SETTINGS,
    CHECKPOINT_SETTINGS,
    PRETRAINED_SETTINGS,
    PROBE,
    FinetuneConfig,
    TrainConfig,
)
from finetune.data import (
    MODALITY_SUBSETS,
    FoldData,
    batches,
    feature_dims,
    keep_modalities,
    label_subset,
    labels_of,
    load_utterances,
    split_fold,
)
from finetune.metrics import NOT_A_CLASS, confusion, scores
from finetune.counts import log_counts
from finetune.probe import run_probe
from finetune.prompt import PromptModel, Template
from finetune.protocols import CLASSES, Fold, folds_for
from finetune.report import write_report
from finetune.settings import FitsOnData, Schedule, build_model, schedule_for, text_model
from memobert.config import ConfigError, to_dict
from memobert.schema import Utterance
from memobert.shard_store import folder_manifest
from pretrain.batch import Batch
from pretrain.loader import shard_paths
from pretrain.model import MEmoBERT
from pretrain.train import linear_warmup_decay, param_groups
from preprocessing.text import BUNDLED_BERT, TextTokenizer, text_bert_folder

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Keys that may change between reruns into the same out_dir: they choose which runs to do or where,
# not what a run computes. The device does pick train.precision auto (bf16 on CUDA, fp32 on CPU), so auto
# is resolved before the check (resolve_precision): a device change that changes the precision is a change.
# How shards are fetched never changes a result (skipping would, so data.read.skip_bad_shards is not here).
RERUN_FREE_KEYS = ("settings", "seeds", "folds", "out_dir", "train.device", "data.read.retries", "data.read.backoff_s",
                   "data.read.timeout_s")


@dataclass
class Context:
    """What every run shares: the labeled samples, the tokenizer, the feature dims, the checkpoint, the device."""

    utts: list[Utterance]
    tokenizer: TextTokenizer
    dims: dict[str, int]
    pretrained: MEmoBERT | None
    device: torch.device
    bf16: bool

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def run_path(out_dir: Path, setting: str, seed: int, fold: int) -> Path:
    """Where one run's JSON goes."""
    return Path(out_dir) / "runs" / setting / f"seed{seed}" / f"fold{fold}.json"


def run_finetune(cfg: FinetuneConfig) -> Path:
    """Run every (setting, seed, fold) not yet on disk, write the report; returns results.md."""
    check_ready(cfg)
    cfg = resolve_precision(cfg, cuda=device_for(cfg).type == "cuda")
    out = Path(cfg.out_dir)
    check_and_save_config(out, cfg)
    grid = run_grid(cfg)
    pending = []
    for setting, seed, fold in grid:
        path = run_path(out, setting, seed, fold)
        if path.is_file():
            log.info("skipping %s seed %d fold %d: done (%s)", setting, seed, fold, path)
        else:
            pending.append((setting, seed, fold))
    if pending:
        needs_checkpoint = bool(cfg.checkpoint) and any(s in CHECKPOINT_SETTINGS for s, _, _ in pending)
        ctx = load_context(cfg, needs_checkpoint=needs_checkpoint)
        units = trainings(pending, cfg.data.protocol)
        for i, (setting, seed, unit) in enumerate(units, 1):
            log.info("run %d/%d: %s seed %d fold %s", i, len(units), setting, seed, " and ".join(str(f.index) for f in unit))
            for fold, record in zip(unit, run_folds(setting, seed, unit, cfg, ctx)):
                _write_json(run_path(out, setting, seed, fold.index), record)
    records = [json.loads(run_path(out, *run).read_text()) for run in grid]
    return write_report(out, cfg, records)


def check_ready(cfg: FinetuneConfig) -> None:
    """What the config alone cannot check (defaults and YAML files leave them open): fail before any work."""
    if not cfg.data.shards:
        raise ConfigError("config key 'data.shards': set the labeled shards (--data)")
    try:
        shard_paths(cfg.data.shards)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"config key 'data.shards': {err}") from err
    needing = [s for s in cfg.settings if s in PRETRAINED_SETTINGS]
    if needing and not cfg.checkpoint:
        raise ConfigError(f"config key 'checkpoint': required by {', '.join(needing)} (--checkpoint)")
    if cfg.checkpoint and not Path(cfg.checkpoint).exists():
        raise ConfigError(f"config key 'checkpoint': {cfg.checkpoint} does not exist")
    text_berts = {"model.bert_folder": (cfg.model.bert_folder, "bert_direct" in cfg.settings),
                  "mfn.word_embeddings": (cfg.mfn.word_embeddings, any(s in BASELINE_SETTINGS for s in cfg.settings))}
    for key, (folder, used) in text_berts.items():
        if used and not Path(text_bert_folder(folder)).is_dir():
            raise ConfigError(f"config key '{key}': no text-BERT folder {folder} (a local bert-base-uncased: config.json, "
                              f"vocab.txt, weights; '{BUNDLED_BERT}' is the small offline BERT for demos and tests)")
    if "pretrain_prompt" in cfg.settings:
        _check_prompt(cfg)


def _check_prompt(cfg: FinetuneConfig) -> None:
    """The label words and template against the vocabulary now, not when the first prompt run builds its model."""
    tokenizer = TextTokenizer(_vocab(cfg))
    try:
        tokenizer.label_word_ids(list(cfg.prompt.label_words))
    except ValueError as err:
        raise ConfigError(f"config key 'prompt.label_words': {err}") from err
    try:
        template = Template.from_text(cfg.prompt.template, tokenizer, cfg.prompt.position)
    except (KeyError, ValueError) as err:  # KeyError: a vocabulary without [MASK]
        raise ConfigError(f"config key 'prompt.template': {err}") from err
    if len(template.ids) > cfg.data.max_text_len:
        raise ConfigError(f"config key 'prompt.template': {cfg.prompt.template!r} is {len(template.ids)} tokens, more "
                          f"than data.max_text_len ({cfg.data.max_text_len})")


def resolve_precision(cfg: FinetuneConfig, cuda: bool) -> FinetuneConfig:
    """cfg with train.precision auto made what it means where the runs train: bf16 on CUDA, fp32 otherwise."""
    if cfg.train.precision != "auto":
        return cfg
    return replace(cfg, train=replace(cfg.train, precision="bf16" if cuda else "fp32"))


def shares_training(setting: str) -> bool:
    """Whether folds with the same training speakers and seed train the same model in this setting.

    Not M3ER, whose fit-time hook chooses its threshold on the validation speaker, so a fold pair's two
    trainings differ, nor the seconds-cheap probe. MFN's hook reads the training speakers only.
    """
    return setting not in ("m3er", PROBE)


def run_grid(cfg: FinetuneConfig) -> list[tuple[str, int, int]]:
    """Every (setting, seed, fold) run the config asks for, in the report's order."""
    return [(s, seed, f) for s in cfg.settings for seed in cfg.seeds for f in cfg.fold_numbers]


def trainings(pending: list[tuple[str, int, int]], protocol: str) -> list[tuple[str, int, list[Fold]]]:
    """The pending (setting, seed, fold) runs of a protocol grouped into trainings, in order: folds share one
    where they can."""
    folds = {f.index: f for f in folds_for(protocol)}
    units: dict[tuple[Any, ...], tuple[str, int, list[Fold]]] = {}
    for setting, seed, index in pending:
        fold = folds[index]
        key = (setting, seed, frozenset(fold.train)) if shares_training(setting) else (setting, seed, index)
        units.setdefault(key, (setting, seed, []))[2].append(fold)
    return list(units.values())


@dataclass
class Outcome:
    """What one fold's run produced: test predictions per modality subset and how they were selected."""

    predictions: dict[str, np.ndarray]
    fitted: dict[str, Any]
    history: list[dict[str, Any]]
    selected: int | None
    val_uar: float


def run_folds(setting: str, seed: int, folds: list[Fold], cfg: FinetuneConfig, ctx: Context) -> list[dict[str, Any]]:
    """Train (once for folds that share their training speakers), select on each validation speaker, evaluate
    each test speaker once per modality subset; one record per fold."""
    datas = [fold_data(fold, seed, cfg, ctx) for fold in folds]
    if setting == PROBE:
        outcomes = []
        for data in datas:
            predictions, fitted, history = run_probe(data)
            val_uar = max(h["val_uar"] for h in history if h["subset"] == "tav")
            outcomes.append(Outcome(predictions, fitted, history, None, val_uar))
    else:
        outcomes = train_model(setting, seed, folds, datas, cfg, ctx)
    trained_with = [f.index for f in folds]
    return [_record(setting, seed, fold, data, outcome, trained_with, cfg) for fold, data, outcome in zip(folds, datas, outcomes)]


def fold_data(fold: Fold, seed: int, cfg: FinetuneConfig, ctx: Context) -> FoldData:
    """The fold's speakers' samples, the training ones cut to `data.label_fraction` (seeded)."""
    data = split_fold(ctx.utts, fold)
    for part in ("train", "val", "test"):
        if not getattr(data, part):
            raise ValueError(f"fold {fold.index}: no {part} samples (speakers: train {fold.train}, val {fold.val}, "
                             f"test {fold.test}); check the shards' 'speaker' ids against the {cfg.data.protocol} protocol")
    return replace(data, train=label_subset(data.train, cfg.data.label_fraction, seed))


def _record(setting: str, seed: int, fold: Fold, data: FoldData, outcome: Outcome, trained_with: list[int],
            cfg: FinetuneConfig) -> dict[str, Any]:
    y_test = labels_of(data.test)
    evaluated = {subset: {"scores": scores(y_test, pred, len(CLASSES)),
                          "confusion": confusion(y_test, pred, len(CLASSES)).tolist()}
                 for subset, pred in outcome.predictions.items()}
    pred, full = outcome.predictions["tav"], evaluated.pop("tav")
    predictions = {u.key: int(p) for u, p in zip(data.test, pred)}
    log.info("%s seed %d fold %d: test %s (selected on validation: %s)", setting, seed, fold.index,
             " ".join(f"{k} {v:.3f}" for k, v in full["scores"].items()),
             outcome.selected if outcome.selected is not None else outcome.fitted)
    return {
        "setting": setting,
        "seed": seed,
        "fold": fold.index,
        "protocol": cfg.data.protocol,
        "text_model": text_model(setting, cfg),
        "speakers": {"train": list(fold.train), "val": fold.val, "test": fold.test},
        "label_fraction": cfg.data.label_fraction,
        "samples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        # The folds whose selections came from this one training (the fold alone, or it and its partner).
        "trained_with_folds": trained_with,
        "fitted": outcome.fitted,
        "selected_step": outcome.selected,
        "val_uar": outcome.val_uar,
        "history": outcome.history,
        "scores": full["scores"],
        # The prompt's vocab scoring: test predictions that were no label word (counted wrong).
        "not_a_class": int((pred == NOT_A_CLASS).sum()),
        "confusion": full["confusion"],
        "support": np.bincount(y_test, minlength=len(CLASSES)).tolist(),  # test utterances per class
        "num_predictions": len(predictions),
        "predictions": predictions,
        "missing_modalities": evaluated,
    }


def train_model(
    setting: str, seed: int, folds: list[Fold], datas: list[FoldData], cfg: FinetuneConfig, ctx: Context
) -> list[Outcome]:
    """A torch setting's training, shared by `folds` (same training samples): build, fit-time hook, train,
    select per validation speaker; each fold's test predictions per modality subset from its selected weights."""
    train_keys = [u.key for u in datas[0].train]
    if any([u.key for u in data.train] != train_keys for data in datas[1:]):
        raise ValueError(f"folds {[f.index for f in folds]} do not share their training samples: train them apart")
    if len(folds) > 1 and not shares_training(setting):
        raise ValueError(f"{setting} fits on the validation speaker before training: its folds cannot share a training")
    model, fitted = build_and_prepare(setting, seed, folds[0], datas[0], cfg, ctx)
    selections = train_and_select(model, datas[0].train, [d.val for d in datas], cfg, seed, ctx,
                                  schedule_for(setting, cfg),
                                  desc=f"{setting} s{seed} f{'+'.join(str(f.index) for f in folds)}")
    outcomes = []
    for data, selection in zip(datas, selections):
        model.load_state_dict(selection.weights)
        predictions = {subset: predict(model, keep_modalities(data.test, subset), cfg, ctx) for subset in MODALITY_SUBSETS}
        outcomes.append(Outcome(predictions, fitted, selection.history, selection.step, selection.uar))
    return outcomes


def build_and_prepare(
    setting: str, seed: int, fold: Fold, data: FoldData, cfg: FinetuneConfig, ctx: Context
) -> tuple[nn.Module, dict[str, Any]]:
    """The setting's model under `seed` (random init, classifier, dropout) with its fit-time hook run on `data`."""
    torch.manual_seed(seed)
    model = build_model(setting, cfg, ctx.dims, ctx.tokenizer, ctx.pretrained).to(ctx.device)
    # The fit-time hook never reads the test speaker, not even under a protocol whose validation speaker is the
    # test speaker (msp_improv_11to1): there the training speakers stand in for validation (M3ER's threshold).
    fitted = prepare(model, data if fold.val != fold.test else replace(data, val=data.train), cfg, ctx)
    return model, fitted


def prepare(model: nn.Module, data: FoldData, cfg: FinetuneConfig, ctx: Context) -> dict[str, Any]:
    """Run the model's fit-time hook, if it has one, on the training and validation speakers (never the test one)."""
    if not isinstance(model, FitsOnData):
        return {}
    tok = ctx.tokenizer

    def source(utts: list[Utterance]) -> Callable[[], Iterator[Batch]]:
        return lambda: (b.to(ctx.device) for b in batches(utts, cfg.train.batch_size, cfg.data, tok.cls_id, tok.sep_id))

    return model.prepare(source(data.train), source(data.val))


def optimizer_and_schedule(
    model: nn.Module, schedule: Schedule, train: TrainConfig, fused: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and LayerNorm) and its lr: linear warm-up, then linear decay to 0 at the last step.

    Fused: on a CPU torch otherwise runs its per-tensor for-loop, ~7% of BERT+Direct's step and ~12% of the
    tiny flavor's (benchmarks/finetune_step.py).
    """
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=schedule.lr, betas=tuple(train.betas),
                                  fused=fused)
    factor = linear_warmup_decay(schedule.warmup_steps, schedule.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_batches(
    train: list[Utterance], cfg: FinetuneConfig, ctx: Context, generator: torch.Generator
) -> Iterator[Batch]:
    """Shuffled training batches without end: each pass over the training speakers is a new permutation."""
    ids = ctx.tokenizer
    while True:
        yield from batches(train, cfg.train.batch_size, cfg.data, ids.cls_id, ids.sep_id, generator)


@dataclass
class Selection:
    """Model selection on one validation speaker: its validations, the best step, its UAR and its weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    step: int = 0
    uar: float = -1.0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    stale: int = 0  # validations since the best one


def train_and_select(
    model: nn.Module, train: list[Utterance], vals: list[list[Utterance]], cfg: FinetuneConfig, seed: int,
    ctx: Context, schedule: Schedule, desc: str = "train"
) -> list[Selection]:
    """Train on `train` for at most `schedule.steps`; keep, per validation set, the weights of its best UAR.

    Validates every `train.val_every` steps and after the last. A validation set stops being scored after
    `train.patience` validations without a better UAR; training stops when every one has. Validations
    never change the training, so each selection is the one a training for that set alone would make.
    The test speaker is not seen here. The model is left with its last weights.
    """
    train_cfg = cfg.train
    optimizer, scheduler = optimizer_and_schedule(model, schedule, train_cfg)
    y_vals = [labels_of(val) for val in vals]
    selections = [Selection() for _ in vals]
    total, seen = 0.0, 0
    model.train()
    stream = training_batches(train, cfg, ctx, torch.Generator().manual_seed(seed))
    for step in tqdm(range(1, schedule.steps + 1), desc=desc, leave=False, disable=None):
        batch = next(stream).to(ctx.device)
        lr = scheduler.get_last_lr()[0]
        loss = train_step(model, batch, optimizer, scheduler, train_cfg.grad_clip, ctx.autocast())
        total += loss.item() * batch.size
        seen += batch.size
        if step % train_cfg.val_every and step < schedule.steps:
            continue
        for selection, val, y_val in zip(selections, vals, y_vals):
            if selection.stale >= train_cfg.patience:
                continue  # this validation speaker's selection is over
            val_uar = scores(y_val, predict(model, val, cfg, ctx), len(CLASSES))["uar"]
            selection.history.append({"step": step, "lr": lr, "train_loss": total / seen, "val_uar": val_uar})
            log.debug("%s step %d: lr %.3g, train loss %.4f, validation UAR %.4f (%s)", desc, step, lr, total / seen,
                      val_uar, val[0].meta["speaker"])
            if val_uar > selection.uar:  # strictly better: ties keep the earlier step
                selection.step, selection.uar, selection.stale = step, val_uar, 0
                selection.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                selection.stale += 1
        model.train()
        total, seen = 0.0, 0
        if all(selection.stale >= train_cfg.patience for selection in selections):
            break
    return selections


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    grad_clip: float,
    autocast: ContextManager,
) -> torch.Tensor:
    """One optimizer step: the loss under `autocast`, backward, clipping, AdamW, the schedule; returns the loss."""
    with autocast:
        loss = model.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss


@torch.no_grad()
def predict(model: nn.Module, utts: list[Utterance], cfg: FinetuneConfig, ctx: Context) -> np.ndarray:
    """Predicted class ids, in the order of `utts` (eval mode: no dropout); NOT_A_CLASS where the prompt's
    vocab scoring picked a non-label word."""
    model.eval()
    out = []
    tok = ctx.tokenizer
    for batch in batches(utts, cfg.train.batch_size, cfg.data, tok.cls_id, tok.sep_id):
        with ctx.autocast():
            batch = batch.to(ctx.device)
            out.append((model.classify(batch) if isinstance(model, PromptModel) else model(batch).argmax(-1)).cpu())
    return torch.cat(out).numpy()


def load_context(cfg: FinetuneConfig, needs_checkpoint: bool) -> Context:
    """The labeled samples, tokenizer, feature dims, device and (if needed) the checkpoint that every run shares."""
    from pretrain.export import load_model

    utts = load_utterances(cfg.data.shards, cfg.data)
    log.info("%d labeled samples from %s", len(utts), cfg.data.shards)
    log_counts(utts, cfg.data)
    pretrained = load_model(Path(cfg.checkpoint)) if needs_checkpoint else None
    bf16 = cfg.train.precision == "bf16"  # the caller resolved auto (resolve_precision)
    return Context(utts, TextTokenizer(_vocab(cfg)), feature_dims(utts), pretrained, device_for(cfg), bf16)


def device_for(cfg: FinetuneConfig) -> torch.device:
    """train.device, with auto meaning CUDA where there is one."""
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _vocab(cfg: FinetuneConfig) -> str | None:
    """cfg.vocab, else the vocabulary the shards' manifest records, else None (bert-base-uncased, bundled)."""
    if cfg.vocab:
        return cfg.vocab
    manifest = folder_manifest(cfg.data.shards)
    return manifest.extractors.get("text", {}).get("vocab") if manifest is not None else None


def check_and_save_config(out: Path, cfg: FinetuneConfig) -> None:
    """Finished runs are reused, so they must come from the same config (up to RERUN_FREE_KEYS)."""
    path = out / CONFIG_NAME
    new = _flatten(to_dict(cfg))
    if path.is_file():
        # A key the saved config lacks (a section added since, e.g. mfn / m3er) counts as its default.
        old = {**_flatten(to_dict(FinetuneConfig())), **_flatten(json.loads(path.read_text()))}
        for key in sorted(set(old) | set(new)):
            if key not in RERUN_FREE_KEYS and old.get(key) != new.get(key):
                raise ConfigError(f"config key '{key}': {out} holds runs made with {old.get(key)!r}, now "
                                  f"{new.get(key)!r}; use another out_dir, or remove {out}")
    _write_json(path, to_dict(cfg))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value  # JSON has no tuples
    return flat


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Atomic: a run killed mid-write leaves no JSON, so the rerun redoes it instead of skipping it.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
