"""The CV driver: every (setting, seed, fold) run, model selection on the validation speaker, then the report.

One run fits what the model fits before training (FitsOnData: the baselines' input statistics, M3ER's
CCA, proxy maps and threshold), trains on the fold's training speakers, picks the epoch with the best
validation-speaker UAR (early stopping on it too), reloads those weights and evaluates the test speaker
once, with every input and with each of the 6 other non-empty modality subsets (the missing-modality
table). Each run writes runs/<setting>/seed<k>/fold<n>.json; a rerun skips the runs whose JSON exists.

No DeepSpeed downstream: a fold is a few thousand utterances and a BERT-base model fits one device many
times over, so there is nothing to shard or accumulate; a plain loop on one device keeps model selection
(copy the best weights, reload them) trivial and needs no process group per run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finetune.config import CHECKPOINT_SETTINGS, PRETRAINED_SETTINGS, FinetuneConfig
from finetune.data import (
    MODALITY_SUBSETS,
    FoldData,
    batches,
    feature_dims,
    keep_modalities,
    labels_of,
    load_utterances,
    split_fold,
)
from finetune.metrics import confusion, scores
from finetune.prompt import Template
from finetune.protocols import CLASSES, Fold, folds_for
from finetune.report import write_report
from finetune.settings import FitsOnData, build_model, learning_rate, text_model
from memobert.config import ConfigError, to_dict
from memobert.schema import MANIFEST_NAME, Manifest, Utterance
from pretrain.batch import Batch
from pretrain.loader import shard_paths
from pretrain.model import MEmoBERT
from pretrain.train import param_groups
from preprocessing.text import TextTokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
# Keys that may change between reruns into the same out_dir: they choose which runs to do or where,
# not what a run computes. The device does pick train.precision auto (bf16 on CUDA, fp32 on CPU), so auto
# is resolved before the check (resolve_precision): a device change that changes the precision is a change.
RERUN_FREE_KEYS = ("settings", "seeds", "folds", "out_dir", "train.device")


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
    torch.manual_seed(seed)  # classifier / random init and dropout follow the seed
    model = build_model(setting, cfg, ctx.dims, ctx.tokenizer, ctx.pretrained).to(ctx.device)
    fitted = prepare(model, data, cfg, ctx)
    history, selected = train_and_select(model, data, cfg, seed, ctx, desc=f"{setting} s{seed} f{fold.index}",
                                         lr=learning_rate(setting, cfg))

    y_test = labels_of(data.test)
    evaluated = {}
    for subset in MODALITY_SUBSETS:
        pred = predict(model, keep_modalities(data.test, subset), cfg, ctx)
        evaluated[subset] = pred, {"scores": scores(y_test, pred, len(CLASSES)),
                                   "confusion": confusion(y_test, pred, len(CLASSES)).tolist()}
    pred, full = evaluated.pop("tav")
    predictions = {u.key: int(p) for u, p in zip(data.test, pred)}
    log.info("%s seed %d fold %d: test %s (epoch %d selected on validation)", setting, seed, fold.index,
             " ".join(f"{k} {v:.3f}" for k, v in full["scores"].items()), selected)
    return {
        "setting": setting,
        "seed": seed,
        "fold": fold.index,
        "protocol": cfg.data.protocol,
        "text_model": text_model(setting, cfg),
        "speakers": {"train": list(fold.train), "val": fold.val, "test": fold.test},
        "samples": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "fitted": fitted,
        "selected_epoch": selected,
        "val_uar": history[selected - 1]["val_uar"],
        "history": history,
        "scores": full["scores"],
        "confusion": full["confusion"],
        "num_predictions": len(predictions),
        "predictions": predictions,
        "missing_modalities": {subset: result for subset, (_, result) in evaluated.items()},
    }


def prepare(model: nn.Module, data: FoldData, cfg: FinetuneConfig, ctx: Context) -> dict[str, Any]:
    """Run the model's fit-time hook, if it has one, on the training and validation speakers (never the test one)."""
    if not isinstance(model, FitsOnData):
        return {}
    tok = ctx.tokenizer

    def source(utts: list[Utterance]) -> Callable[[], Iterator[Batch]]:
        return lambda: (b.to(ctx.device) for b in batches(utts, cfg.train.batch_size, cfg.data, tok.cls_id, tok.sep_id))

    return model.prepare(source(data.train), source(data.val))


def train_and_select(
    model: nn.Module, data: FoldData, cfg: FinetuneConfig, seed: int, ctx: Context, desc: str, lr: float
) -> tuple[list[dict[str, float]], int]:
    """Train on the training speakers at `lr`; keep the weights of the epoch with the best validation UAR.

    Stops after `train.patience` epochs without a better validation UAR. The test speaker is not seen here.
    Returns the per-epoch history and the selected epoch (1-based).
    """
    train = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    y_val = labels_of(data.val)
    ids = ctx.tokenizer
    history: list[dict[str, float]] = []
    best_uar, selected, best_state = -1.0, 0, None
    for epoch in range(1, train.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        steps = batches(data.train, train.batch_size, cfg.data, ids.cls_id, ids.sep_id, generator)
        for batch in tqdm(steps, total=math.ceil(len(data.train) / train.batch_size), desc=f"{desc} epoch {epoch}",
                          leave=False, disable=None):
            batch = batch.to(ctx.device)
            with ctx.autocast():
                loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            total += loss.item() * batch.size
            seen += batch.size
        val_uar = scores(y_val, predict(model, data.val, cfg, ctx), len(CLASSES))["uar"]
        history.append({"epoch": epoch, "train_loss": total / seen, "val_uar": val_uar})
        log.debug("%s epoch %d: train loss %.4f, validation UAR %.4f", desc, epoch, total / seen, val_uar)
        if val_uar > best_uar:  # strictly better: ties keep the earlier epoch
            best_uar, selected = val_uar, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - selected >= train.patience:
            break
    model.load_state_dict(best_state)
    return history, selected


@torch.no_grad()
def predict(model: nn.Module, utts: list[Utterance], cfg: FinetuneConfig, ctx: Context) -> np.ndarray:
    """Predicted class ids, in the order of `utts` (eval mode: no dropout)."""
    model.eval()
    out = []
    tok = ctx.tokenizer
    for batch in batches(utts, cfg.train.batch_size, cfg.data, tok.cls_id, tok.sep_id):
        with ctx.autocast():
            out.append(model(batch.to(ctx.device)).argmax(-1).cpu())
    return torch.cat(out).numpy()


def _context(cfg: FinetuneConfig, needs_checkpoint: bool) -> Context:
    from pretrain.export import load_model

    utts = load_utterances(cfg.data.shards, cfg.data)
    log.info("%d labeled samples from %s", len(utts), cfg.data.shards)
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
    shards = Path(cfg.data.shards)
    if (shards / MANIFEST_NAME).is_file():
        return Manifest.load(shards).extractors.get("text", {}).get("vocab")
    return None


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
