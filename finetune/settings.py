"""The downstream settings as models with one interface: forward(batch) -> class scores [B, C],
loss(batch) -> scalar, and optionally a fit-time hook (FitsOnData).

direct             MEmoBERT from random init (the checkpoint's shape, else the flavor's) + a new classifier
bert_direct        MEmoBERT initialised from a text BERT (model.bert_folder) + a new classifier
pretrain_finetune  the pretrained MEmoBERT + a new classifier on [CLS]
pretrain_prompt    the pretrained MEmoBERT through its MLM head (finetune/prompt.py), no new parameters
mfn                the Memory Fusion Network baseline (finetune/baselines/mfn.py)
m3er               the M3ER baseline: modality check, proxies, MFN, multiplicative loss (finetune/baselines/m3er.py)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.nn import functional as F
from transformers import BertConfig

from finetune.baselines import build_baseline
from finetune.baselines.inputs import BatchSource
from finetune.config import BASELINE_SETTINGS, PRETRAINED_SETTINGS, FinetuneConfig
from finetune.prompt import PromptModel, Template
from finetune.protocols import CLASSES
from memobert.config import ConfigError
from pretrain.batch import Batch
from pretrain.config import ModelConfig
from pretrain.model import MEmoBERT
from preprocessing.text import TextTokenizer, text_bert_folder


@runtime_checkable
class FitsOnData(Protocol):
    """A model with a fit-time hook, run once before training on the fold's training and validation speakers."""

    def prepare(self, train: BatchSource, val: BatchSource) -> dict[str, Any]:
        """Fit what training needs (statistics, maps, thresholds); returns what to record in the run's JSON."""


class ClassifierHead(nn.Module):
    """The authors' head on [CLS]: BERT's pooler (Linear + tanh), dropout, then Linear(h, 2h)-GELU-LayerNorm-Linear."""

    def __init__(self, hidden: int, num_classes: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=eps),
                                    nn.Linear(2 * hidden, num_classes))

    def forward(self, cls: Tensor) -> Tensor:
        return self.output(self.dropout(self.pooler(cls)))


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """The mean of states [B, L, H] over the positions where mask [B, L] is True; zeros where none is."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ClassifierModel(nn.Module):
    """MEmoBERT + the authors' classifier head (ClassifierHead) on [CLS], or on the mean of the valid positions."""

    def __init__(self, backbone: MEmoBERT, num_classes: int, dropout: float, pooling: str = "cls") -> None:
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        config = backbone.config
        self.head = ClassifierHead(config.hidden_size, num_classes, dropout, config.layer_norm_eps)
        self.head.apply(backbone._init_new)

    def forward(self, batch: Batch) -> Tensor:
        encoded = self.backbone.encode(batch)
        if self.pooling == "cls":
            return self.head(encoded.cls)
        return self.head(masked_mean(encoded.sequence, encoded.sequence_mask))

    def loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self(batch), batch.labels)


@dataclass(frozen=True)
class Schedule:
    """One setting's optimisation: peak lr, optimizer steps (the lr is 0 at the last), linear warm-up steps."""

    lr: float
    steps: int
    warmup_steps: int


def schedule_for(setting: str, cfg: FinetuneConfig) -> Schedule:
    """The authors' per-setting values: prompt lr and warm-up for pretrain_prompt, more steps for direct."""
    train = cfg.train
    if setting == "pretrain_prompt":
        return Schedule(cfg.prompt.lr, train.steps, cfg.prompt.warmup_steps)
    if setting == "direct":
        return Schedule(train.lr, train.direct_steps, train.warmup_steps)
    if setting == "bert_direct" and train.bert_lr is not None:
        return Schedule(train.bert_lr, train.steps, train.warmup_steps)
    if setting in BASELINE_SETTINGS:  # trained from scratch at an Adam-range rate (mfn.lr)
        return Schedule(cfg.mfn.lr, train.steps, train.warmup_steps)
    return Schedule(train.lr, train.steps, train.warmup_steps)


def build_model(
    setting: str,
    cfg: FinetuneConfig,
    dims: dict[str, int],
    tokenizer: TextTokenizer,
    pretrained: MEmoBERT | None,
) -> nn.Module:
    """A fresh model for one run of `setting` (seed torch first: random init and dropout follow it).

    dims: acoustic_dim / visual_dim / vprob_dim of the data; pretrained: the loaded checkpoint (copied,
    never changed), or None when no checkpoint was given.
    """
    if setting in BASELINE_SETTINGS:
        return build_baseline(setting, cfg, dims, tokenizer)  # they read no checkpoint
    if pretrained is not None:
        check_dims(pretrained, dims)
    if setting == "direct":
        if pretrained is not None:
            backbone = MEmoBERT(BertConfig.from_dict(pretrained.config.to_dict()), pretrained.model_cfg)
        else:
            backbone = MEmoBERT.from_config(ModelConfig(flavor=cfg.model.flavor, **dims), vocab_size=tokenizer.vocab_size)
    elif setting == "bert_direct":
        folder = text_bert_folder(cfg.model.bert_folder)
        backbone = MEmoBERT.from_config(ModelConfig(init_from=folder, **dims), vocab_size=tokenizer.vocab_size)
    elif setting in PRETRAINED_SETTINGS:
        if pretrained is None:
            raise ConfigError(f"config key 'checkpoint': {setting} needs a pretrained checkpoint")
        backbone = copy.deepcopy(pretrained)  # deepcopy keeps the MLM decoder tied to the word embeddings
    else:
        raise ValueError(f"unknown setting {setting!r}")
    if setting == "pretrain_prompt":
        template = Template.from_text(cfg.prompt.template, tokenizer, cfg.prompt.position)
        label_ids = tokenizer.label_word_ids(list(cfg.prompt.label_words))
        return PromptModel(backbone, template, label_ids, cfg.data.max_text_len, cfg.prompt.loss, cfg.prompt.scoring)
    return ClassifierModel(backbone, len(CLASSES), cfg.model.classifier_dropout, cfg.model.classifier_pooling)


def text_model(setting: str, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """The text BERT a setting starts from (bert_direct's weights, the baselines' word embeddings), else None."""
    if setting == "bert_direct":
        folder = text_bert_folder(cfg.model.bert_folder)
    elif setting in BASELINE_SETTINGS:
        folder = text_bert_folder(cfg.mfn.word_embeddings)
    else:
        return None
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}  # the baselines need only model.safetensors
    # The model's own name where it has one: the bundled default's folder is just "model".
    name = Path(config.get("_name_or_path") or folder).name
    return {"folder": str(folder), "name": name, "layers": config.get("num_hidden_layers"),
            "hidden": config.get("hidden_size")}


def check_dims(model: MEmoBERT, dims: dict[str, int]) -> None:
    """The checkpoint must have been pretrained on features of the data's dims."""
    for key, value in dims.items():
        expected = getattr(model.model_cfg, key)
        if expected != value:
            raise ConfigError(f"config key 'checkpoint': its model has {key} {expected}, the labeled shards {value}")
