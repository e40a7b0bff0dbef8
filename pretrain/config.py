"""Pretraining config. Defaults are the MEmoBERT recipe (docs/recipe.md); YAML holds overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from memobert.config import check
from memobert.shard_store import ReadConfig
from preprocessing.text import text_bert_folder

TASKS = ("wwmlm", "spanmvfr", "spanmvfckl", "spanmafr")
# `model.init_from: none` (YAML or command line): random init on purpose. Spelled as a string because
# YAML's null is what an unset key looks like, and the base flavor must not start from random by accident.
RANDOM_INIT = "none"


@dataclass
class ModelConfig:
    # Named shape (pretrain/model.py: FLAVORS). base is BERT-base, the paper's model.
    flavor: Literal["base", "debug", "tiny"] = "base"
    # Local text-BERT folder to initialise from (bert-base-uncased in the paper). Unset (null): random
    # init, an error for the base flavor (see PretrainConfig.validate); "none": random init on purpose;
    # "bundled": the small MiniLM BERT shipped offline (6 layers, 384 wide), for experiments on CPU.
    init_from: str | None = None
    acoustic_dim: int = 768  # pooled wav2vec2-base frames
    visual_dim: int = 342  # DenseNet-BC-100 FER+ features
    vprob_dim: int = 8  # FER+ classes
    type_vocab_size: int = 3  # text 0, visual 1, acoustic 2 (the authors' "difftype")
    dropout: float = 0.1
    # The authors tie the frame-regression output to the input projection.
    tie_frame_regression: bool = True

    @property
    def text_bert(self) -> str | None:
        """The text-BERT folder to initialise from, or None for random init (unset or "none")."""
        return None if self.init_from in (None, RANDOM_INIT) else text_bert_folder(self.init_from)


@dataclass
class DataConfig:
    # A folder (manifest.json, or a remote folder's listing), or a brace/glob pattern of .tar paths or URLs
    # (s3://..., https://...), or pipe:COMMAND (docs/ARCHITECTURE.md, Shard sources).
    train_shards: str = ""
    val_shards: str = ""
    read: ReadConfig = field(default_factory=ReadConfig)  # retries, timeouts and skipping for remote shards
    max_text_len: int = 30  # WordPiece tokens, without [CLS]/[SEP]
    max_visual_len: int = 36
    max_acoustic_len: int = 64
    min_visual_len: int = 10  # clips with fewer visual frames are dropped in pretraining
    # The authors drop, not truncate, clips with more WordPiece tokens than this (0: keep, truncate to max_text_len).
    max_text_tokens: int = 30
    min_words: int = 3  # clips with fewer whitespace-separated words of text are dropped (0: keep all)
    shuffle_buffer: int = 2000
    num_workers: int = 4
    # Shards each loader worker reads at once in training, interleaved into one shuffle buffer (docs/benchmarks.md).
    open_shards: int = 4
    bucket_by_length: bool = True

    def validate(self) -> None:
        for key in ("max_text_len", "max_visual_len", "max_acoustic_len", "open_shards"):
            check(getattr(self, key) > 0, key, "must be positive")
        for key in ("min_visual_len", "max_text_tokens", "min_words", "num_workers"):
            check(getattr(self, key) >= 0, key, "must be >= 0")


@dataclass
class MaskConfig:
    word_mask_prob: float = 0.15  # whole words, BERT 80/10/10
    visual_mask_ratio: float = 0.2
    acoustic_mask_ratio: float = 0.15
    span: int = 3  # frames per masked span

    def validate(self) -> None:
        for key in ("word_mask_prob", "visual_mask_ratio", "acoustic_mask_ratio"):
            check(0.0 < getattr(self, key) < 1.0, key, "must be in (0, 1)")
        check(self.span >= 1, "span", "must be >= 1")


@dataclass
class TaskConfig:
    # one_per_step: the authors' mixing (one task per optimizer step); all: every task every step.
    mode: Literal["one_per_step", "all"] = "one_per_step"
    ratios: dict[str, float] = field(
        default_factory=lambda: {"wwmlm": 2.0, "spanmvfr": 1.0, "spanmvfckl": 1.0, "spanmafr": 1.0}
    )

    def validate(self) -> None:
        for name, ratio in self.ratios.items():
            check(name in TASKS, f"ratios.{name}", f"unknown task; known: {', '.join(TASKS)}")
            check(ratio >= 0, f"ratios.{name}", "must be >= 0")
        check(sum(self.ratios.values()) > 0, "ratios", "at least one task needs a positive ratio")


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6  # AdamW's; torch's default is 1e-8
    # Not decayed (as the authors): parameters named "bias", and LayerNorm weights (pretrain.train.param_groups).
    weight_decay: float = 0.01
    warmup_steps: int = 4000
    # Threshold on the norm of the step's gradient AVERAGED over the global batch (DeepSpeed averages
    # over accumulation steps and ranks), so it clips the same however the batch is split into
    # micro-batch x accumulation x ranks. 1.25 is the authors' 5.0: they back-propagate each of
    # their 4 micro-batch means without dividing by 4 and clip that sum, 4x the average. AdamW is
    # invariant to that 4x scale of the gradient, apart from eps. 0 turns clipping off.
    grad_clip: float = 1.25

    def validate(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(self.eps > 0, "eps", "must be positive")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off, as in DeepSpeed)")


@dataclass
class TrainConfig:
    global_batch: int = 640  # = micro_batch x grad_accum x world size, checked at start
    micro_batch: int = 160
    grad_accum: int = 4
    steps: int = 40_000  # linear decay to 0 over all steps, after warm-up
    zero_stage: Literal[0, 1, 2, 3] = 1  # at 110M parameters ZeRO-2/3 only cost time
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile each encoder layer: fuses its LayerNorm, GELU, dropout and bias kernels. A
    # speed setting, not part of the recipe; off until measured on a GPU (docs/benchmarks.md).
    compile: bool = False
    # Profile optimizer steps [first, last) with torch.profiler: a Chrome trace per rank in
    # <out_dir>/profile, the top ops in the log and, on a GPU, the share of time the device was busy.
    profile_steps: tuple[int, int] | None = None
    seed: int = 42
    out_dir: str = "runs/pretrain"
    log_every: int = 50
    val_every: int = 5000
    val_batches: int = 50
    ckpt_every: int = 5000
    max_nonfinite_in_a_row: int = 20  # non-finite losses are skipped; this many in a row stop the run
    # Stop (with a checkpoint) after this step without changing the schedule: splits a run in
    # parts, e.g. to fit a Slurm time limit. None: run to `steps`.
    stop_at: int | None = None

    def validate(self) -> None:
        for key in ("global_batch", "micro_batch", "grad_accum", "steps", "log_every", "val_every", "val_batches",
                    "ckpt_every", "max_nonfinite_in_a_row"):
            check(getattr(self, key) > 0, key, "must be positive")
        check(self.stop_at is None or self.stop_at > 0, "stop_at", "must be positive, or null to run to train.steps")
        if self.profile_steps is not None:
            steps = self.profile_steps
            check(len(steps) == 2 and 0 <= steps[0] < steps[1], "profile_steps",
                  f"must be [first, last) with 0 <= first < last, got {list(steps)}")
        check(
            self.global_batch % (self.micro_batch * self.grad_accum) == 0,
            "global_batch",
            f"{self.global_batch} is not micro_batch ({self.micro_batch}) x grad_accum ({self.grad_accum}) x a whole world size",
        )


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps", f"exceeds train.steps ({self.train.steps})")
        check(
            self.model.flavor != "base" or self.model.init_from is not None,
            "model.init_from",
            "the base flavor starts from a text BERT: give its local folder (e.g. model.init_from=checkpoints/"
            f"bert-base-uncased), or model.init_from={RANDOM_INIT} for a random init on purpose",
        )
