"""Finetuning config. Defaults are the MEmoBERT downstream recipe (docs/recipe.md); YAML holds overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from finetune.protocols import CLASSES, Fold, folds_for
from memobert.config import check
from memobert.shard_store import ReadConfig

Setting = Literal["direct", "bert_direct", "pretrain_finetune", "pretrain_prompt", "mfn", "m3er", "probe"]
SETTINGS: tuple[str, ...] = get_args(Setting)
# The paper's four settings: the default list. The baselines (finetune/baselines/) are opt-in.
PAPER_SETTINGS = SETTINGS[:4]
BASELINE_SETTINGS = ("mfn", "m3er")
# Logistic regressions on pooled features (finetune/probe.py): checks that shards carry the class; opt-in.
PROBE = "probe"
# Settings whose backbone is the pretrained MEmoBERT: they need `checkpoint`.
PRETRAINED_SETTINGS = ("pretrain_finetune", "pretrain_prompt")
# Settings that read a given checkpoint (direct takes its shape); the others ignore it.
CHECKPOINT_SETTINGS = ("direct", *PRETRAINED_SETTINGS)
# Settings with the authors' classifier head (finetune/settings.py ClassifierHead; model.classifier_pooling).
CLASSIFIER_HEAD_SETTINGS = ("direct", "bert_direct", "pretrain_finetune")


@dataclass
class DataConfig:
    shards: str = ""  # labeled shards: a folder, a brace/glob pattern of .tar paths or URLs, or pipe:COMMAND
    read: ReadConfig = field(default_factory=ReadConfig)  # retries, timeouts and skipping for remote shards
    # msp_improv_11to1: the authors' MSP-IMPROV runs (train on the other 11 speakers, select on the test
    # speaker): test-selected, for comparison with their table only; msp_improv is the leak-free protocol.
    protocol: Literal["iemocap", "msp_improv", "msp_improv_11to1"] = "iemocap"
    # Downstream lengths: 120 text tokens (without [CLS]/[SEP]; the authors' 30 here was a bug they fixed).
    max_text_len: int = 120
    max_visual_len: int = 36
    max_acoustic_len: int = 64
    # Share of the training speakers' utterances that keep their labels (few-shot runs): drawn per seed and
    # class, so every class keeps its share; validation and test speakers always keep all of theirs.
    label_fraction: float = 1.0

    def validate(self) -> None:
        for key in ("max_text_len", "max_visual_len", "max_acoustic_len"):
            check(getattr(self, key) > 0, key, "must be positive")
        check(0.0 < self.label_fraction <= 1.0, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")


@dataclass
class ModelConfig:
    # Shape of `direct` when no checkpoint is given (with one, `direct` takes the checkpoint's shape).
    flavor: Literal["base", "debug", "tiny"] = "base"
    # Local text-BERT folder `bert_direct` starts from: bert-base-uncased, as in the paper (the same folder
    # as pretraining's model.init_from). "bundled": the small MiniLM BERT shipped offline (demo and tests).
    bert_folder: str = "checkpoints/bert-base-uncased"
    # On the pooled [CLS] (pooler: Linear + tanh), before the authors' head Linear(h, 2h)-GELU-LayerNorm-Linear.
    classifier_dropout: float = 0.1
    # What the head reads: cls, the [CLS] state (the authors'); mean, the mean state over every valid text,
    # visual and acoustic position (beyond the paper: no pretraining task trains [CLS], docs/benchmarks.md).
    classifier_pooling: Literal["cls", "mean"] = "cls"

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
    # label_words: cross-entropy over the label words only.
    loss: Literal["vocab", "label_words"] = "vocab"
    # vocab: the authors' evaluation, argmax over the whole vocabulary at [MASK] (a word that is not a label
    # word counts as wrong); label_words: argmax over the label words only (more lenient).
    scoring: Literal["vocab", "label_words"] = "vocab"
    # The authors' prompt runs: a smaller lr with a linear warm-up (steps and the rest come from `train`).
    lr: float = 3e-5
    warmup_steps: int = 100

    def validate(self) -> None:
        check(self.template.count("[MASK]") == 1, "template", f"needs exactly one [MASK], got {self.template!r}")
        check(len(self.label_words) == len(CLASSES), "label_words", f"needs one word per class {list(CLASSES)}")
        check(len(set(self.label_words)) == len(self.label_words), "label_words", "must be distinct")
        check(self.lr > 0, "lr", "must be positive")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class MFNConfig:
    """MFN (Zadeh et al. 2018): the `mfn` setting, and M3ER's classifier."""

    # Every modality is average-pooled into this many equal time bins (M3ER's 20 aligned steps).
    steps: int = 20
    # Sizes: the authors' released MOSI config (pliang279/MFN configs/mosi.json: cellsizes, memsize,
    # contextSize, NN1 / NN2 / gamma1 / gamma2 shapes and dropout, sentFCNN).
    cells: list[int] = field(default_factory=lambda: [64, 16, 32])  # LSTM cells: language, acoustic, visual
    memory: int = 128  # multi-view gated memory size
    window: int = 2  # cell states of t-1 and t go into the Delta-memory Attention Network
    attention_hidden: int = 256  # NN1: the DMAN's attention network
    proposal_hidden: int = 64  # NN2: the memory update proposal network
    gate_hidden: int = 64  # gamma1 (retain) and gamma2 (update) networks
    output_hidden: int = 64  # the output network (and M3ER's per-modality heads)
    dropout: float = 0.5  # inside every one of those networks, as released
    # The baselines train from scratch: Adam-range rates (MFN's search: 0.001..0.01), not train.lr (5e-5,
    # a BERT finetuning rate). Steps, batch size, validation, early stopping and clipping come from `train`.
    lr: float = 1e-3
    # Text-BERT folder whose frozen word embeddings, averaged per word, are the language input: bert-base-uncased
    # (768-d), as MEmoBERT's text side. "bundled": the small MiniLM BERT shipped offline (384-d; demo and tests).
    word_embeddings: str = "checkpoints/bert-base-uncased"

    def validate(self) -> None:
        check(len(self.cells) == 3 and all(c > 0 for c in self.cells), "cells", "needs 3 positive sizes (l, a, v)")
        check(self.window >= 2, "window", "must be >= 2 (the DMAN compares t-1 and t)")
        for key in ("steps", "memory", "attention_hidden", "proposal_hidden", "gate_hidden", "output_hidden"):
            check(getattr(self, key) > 0, key, "must be positive")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(self.lr > 0, "lr", "must be positive")


@dataclass
class M3ERConfig:
    """M3ER (Mittal et al. 2020) on top of the `mfn` section's MFN; each part switches off on its own."""

    modality_check: bool = True  # CCA between modality summaries; weakly correlated modalities are ineffective
    proxy: bool = True  # ineffective (or empty) modalities replaced by a linear map of the effective ones
    multiplicative_loss: bool = True  # per-modality heads + the multiplicative combination loss; off: MFN's CE
    # In [0, 1]; 0 gives the product-of-probabilities NLL. M3ER does not publish its value: the middle.
    beta: float = 0.5
    pca_dim: int = 16  # time-averaged features reduced by PCA (training fold) before CCA
    # Canonical pairs compared per sample: more make a chance agreement of mismatched modalities rarer;
    # weak ones count little (the per-sample score weights them by their canonical correlation).
    cca_dim: int = 8
    # Candidate thresholds on the per-sample canonical correlation; one is chosen on the validation speaker.
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    ridge: float = 1e-3  # proxy least squares: ridge relative to the mean feature energy (conditioning)

    def validate(self) -> None:
        check(0.0 <= self.beta <= 1.0, "beta", "must be in [0, 1]")
        check(self.pca_dim > 0, "pca_dim", "must be positive")
        check(0 < self.cca_dim <= self.pca_dim, "cca_dim", "must be in 1..pca_dim")
        check(len(self.thresholds) > 0 and all(-1.0 <= t <= 1.0 for t in self.thresholds), "thresholds",
              "name at least one threshold in [-1, 1]")
        check(self.ridge > 0, "ridge", "must be positive (it keeps the proxy least squares solvable)")


@dataclass
class TrainConfig:
    """The authors' step-based finetuning (train_emo_*.sh): AdamW, linear decay to 0, validation every
    `val_every` steps, early stop after `patience` validations without a better validation UAR; the
    weights of the best validation are tested. prompt.lr / prompt.warmup_steps and mfn.lr replace lr and
    warmup_steps for those settings."""

    lr: float = 5e-5
    # bert_direct's peak lr; null: `lr`, as the authors (one rate for every BERT-sized setting). For runs whose
    # MEmoBERT is much smaller than the text BERT bert_direct starts from (the demo's tiny flavor beside MiniLM).
    bert_lr: float | None = None
    batch_size: int = 32
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    steps: int = 1500  # most optimizer steps of a run; the lr reaches 0 at the last
    direct_steps: int = 2000  # `direct` starts from random init: the authors give it more steps
    warmup_steps: int = 0
    val_every: int = 100  # steps between validations (and after the last step)
    patience: int = 5  # validations without a better validation UAR before stopping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU

    def validate(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(self.bert_lr is None or self.bert_lr > 0, "bert_lr", "must be positive (or null: lr)")
        for key in ("batch_size", "steps", "direct_steps", "val_every", "patience"):
            check(getattr(self, key) > 0, key, "must be positive")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {list(self.betas)}")
        # clip_grad_norm_ with a max norm of 0 zeroes every gradient: nothing would train.
        check(self.grad_clip > 0, "grad_clip", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")


@dataclass
class FinetuneConfig:
    settings: list[Setting] = field(default_factory=lambda: list(PAPER_SETTINGS))
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
    mfn: MFNConfig = field(default_factory=MFNConfig)
    m3er: M3ERConfig = field(default_factory=M3ERConfig)
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

    @property
    def selected_folds(self) -> list[Fold]:
        """The folds to run, as the protocol's Fold objects."""
        return [f for f in folds_for(self.data.protocol) if f.index in self.fold_numbers]
