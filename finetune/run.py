"""The CV driver: every (setting, seed, fold) run, model selection on the validation speaker, then the report.

One run fits what the model fits before training (FitsOnData: the baselines' input statistics, M3ER's
CCA, proxy maps and threshold), trains on the fold's training speakers for a fixed number of steps with
the lr decaying linearly to 0, validates every `train.val_every` steps, stops after `train.patience`
validations without a better validation-speaker UAR, reloads the weights of the best validation and
evaluates the test speaker once, with every input and with each of the 6 other non-empty modality
subsets (the missing-modality table). Each run writes runs/<setting>/seed<k>/fold<n>.json; a rerun
skips the runs whose JSON exists.

No DeepSpeed downstream: a fold is a few thousand utterances and a BERT-base model fits one device many
times over, so there is nothing to shard or accumulate; a plain loop on one device keeps model selection
(copy the best weights, reload them) trivial and needs no process group per run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
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
    cfg = resolve_precision(cfg, cuda=_device(cfg).type == "cuda")
    out = Path(cfg.out_dir)
    check_and_save_config(out, cfg)
    folds = {f.index: f for f in folds_for(cfg.data.protocol)}
    grid = [(s, seed, f) for s in cfg.settings for seed in cfg.seeds for f in cfg.fold_numbers]
    pending = []
    for setting, seed, fold in grid:
        path = run_path(out, setting, seed, fold)
        if path.is_file():
            log.info("skipping %s seed %d fold %d: done (%s)", setting, seed, fold, path)
        else:
            pending.append((setting, seed, fold))
    if pending:
        needs_checkpoint = bool(cfg.checkpoint) and any(s in CHECKPOINT_SETTINGS for s, _, _ in pending)
        ctx = _context(cfg, needs_checkpoint=needs_checkpoint)
        for i, (setting, seed, fold) in enumerate(pending, 1):
            log.info("run %d/%d: %s seed %d fold %d", i, len(pending), setting, seed, fold)
            record = run_one(setting, seed, folds[fold], cfg, ctx)
            _write_json(run_path(out, setting, seed, fold), record)
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


def run_one(setting: str, seed: int, fold: Fold, cfg: FinetuneConfig, ctx: Context) -> dict[str, Any]:
    """Train, select on the validation speaker, evaluate the test speaker once per modality subset."""
    data = split_fold(ctx.utts, fold)
    for part in ("train", "val", "test"):
        if not getattr(data, part):
            raise ValueError(f"fold {fold.index}: no {part} samples (speakers: train {fold.train}, val {fold.val}, "
                             f"test {fold.test}); check the shards' 'speaker' ids against the {cfg.data.protocol} protocol")
    data = replace(data, train=label_subset(data.train, cfg.data.label_fraction, seed))
    if setting == PROBE:
        test_predictions, fitted, history = run_probe(data)
        selected = None
        val_uar = max(h["val_uar"] for h in history if h["subset"] == "tav")
    else:
        test_predictions, fitted, history, selected = train_model(setting, seed, fold, data, cfg, ctx)
        val_uar = next(h["val_uar"] for h in history if h["step"] == selected)

    y_test = labels_of(data.test)
    evaluated = {subset: {"scores": scores(y_test, pred, len(CLASSES)),
                          "confusion": confusion(y_test, pred, len(CLASSES)).tolist()}
                 for subset, pred in test_predictions.items()}
    pred, full = test_predictions["tav"], evaluated.pop("tav")
    predictions = {u.key: int(p) for u, p in zip(data.test, pred)}
    log.info("%s seed %d fold %d: test %s (selected on validation: %s)", setting, seed, fold.index,
             " ".join(f"{k} {v:.3f}" for k, v in full["scores"].items()), selected if selected is not None else fitted)
    return {
        "setting": setting,
        "seed": seed,
        "fold": fold.index,
        "protocol": cfg.data.protocol,
        "text_model": text_model(setting, cfg),
        "speakers": {"train": list(fold.train), "val": fold.val, "test": fold.test},
        "label_fraction": cfg.data.label_fraction,
        "samples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "fitted": fitted,
        "selected_step": selected,
        "val_uar": val_uar,
        "history": history,
        "scores": full["scores"],
        # The prompt's vocab scoring: test predictions that were no label word (counted wrong).
        "not_a_class": int((pred == NOT_A_CLASS).sum()),
        "confusion": full["confusion"],
        "num_predictions": len(predictions),
        "predictions": predictions,
        "missing_modalities": evaluated,
    }


def train_model(
    setting: str, seed: int, fold: Fold, data: FoldData, cfg: FinetuneConfig, ctx: Context
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[dict[str, float]], int]:
    """A torch setting's run: build, fit-time hook, train and select; test predictions per modality subset."""
    torch.manual_seed(seed)  # classifier / random init and dropout follow the seed
    model = build_model(setting, cfg, ctx.dims, ctx.tokenizer, ctx.pretrained).to(ctx.device)
    # The fit-time hook never reads the test speaker, not even under a protocol whose validation speaker is the
    # test speaker (msp_improv_11to1): there the training speakers stand in for validation (M3ER's threshold).
    fitted = prepare(model, data if fold.val != fold.test else replace(data, val=data.train), cfg, ctx)
    history, selected = train_and_select(model, data, cfg, seed, ctx, desc=f"{setting} s{seed} f{fold.index}",
                                         schedule=schedule_for(setting, cfg))
    predictions = {subset: predict(model, keep_modalities(data.test, subset), cfg, ctx) for subset in MODALITY_SUBSETS}
    return predictions, fitted, history, selected


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


def training_batches(data: FoldData, cfg: FinetuneConfig, ctx: Context, generator: torch.Generator) -> Iterator[Batch]:
    """Shuffled training batches without end: each pass over the training speakers is a new permutation."""
    ids = ctx.tokenizer
    while True:
        yield from batches(data.train, cfg.train.batch_size, cfg.data, ids.cls_id, ids.sep_id, generator)


def train_and_select(
    model: nn.Module, data: FoldData, cfg: FinetuneConfig, seed: int, ctx: Context, desc: str, schedule: Schedule
) -> tuple[list[dict[str, float]], int]:
    """Train on the training speakers for at most `schedule.steps`; keep the weights of the best validation UAR.

    Validates every `train.val_every` steps and after the last; stops after `train.patience` validations
    without a better UAR. The test speaker is not seen here. Returns the per-validation history and the
    selected step.
    """
    train = cfg.train
    optimizer, scheduler = optimizer_and_schedule(model, schedule, train)
    y_val = labels_of(data.val)
    history: list[dict[str, float]] = []
    best_uar, selected, best_state, stale = -1.0, 0, None, 0
    total, seen = 0.0, 0
    model.train()
    stream = training_batches(data, cfg, ctx, torch.Generator().manual_seed(seed))
    for step in tqdm(range(1, schedule.steps + 1), desc=desc, leave=False, disable=None):
        batch = next(stream).to(ctx.device)
        lr = scheduler.get_last_lr()[0]
        loss = train_step(model, batch, optimizer, scheduler, train.grad_clip, ctx.autocast())
        total += loss.item() * batch.size
        seen += batch.size
        if step % train.val_every and step < schedule.steps:
            continue
        val_uar = scores(y_val, predict(model, data.val, cfg, ctx), len(CLASSES))["uar"]
        model.train()
        history.append({"step": step, "lr": lr, "train_loss": total / seen, "val_uar": val_uar})
        log.debug("%s step %d: lr %.3g, train loss %.4f, validation UAR %.4f", desc, step, lr, total / seen, val_uar)
        total, seen = 0.0, 0
        if val_uar > best_uar:  # strictly better: ties keep the earlier step
            best_uar, selected, stale = val_uar, step, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= train.patience:
                break
    model.load_state_dict(best_state)
    return history, selected


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


def _context(cfg: FinetuneConfig, needs_checkpoint: bool) -> Context:
    from pretrain.export import load_model

    utts = load_utterances(cfg.data.shards, cfg.data)
    log.info("%d labeled samples from %s", len(utts), cfg.data.shards)
    log_counts(utts, cfg.data)
    pretrained = load_model(Path(cfg.checkpoint)) if needs_checkpoint else None
    bf16 = cfg.train.precision == "bf16"  # run_finetune resolved auto
    return Context(utts, TextTokenizer(_vocab(cfg)), feature_dims(utts), pretrained, _device(cfg), bf16)


def _device(cfg: FinetuneConfig) -> torch.device:
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
