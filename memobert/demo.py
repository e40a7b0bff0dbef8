"""`memobert demo`: every stage end to end on a generated corpus, on a laptop.

Tiny encoders and the tiny model flavor keep it to minutes on 2 CPU cores; the stages, files
and commands are the ones a real run uses (each stage prints its equivalent command).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from memobert.config import load_config
from preprocessing.synth.config import SynthConfig

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_FINETUNE_YAML = CONFIGS / "finetune/demo_cpu.yaml"


@dataclass
class DemoConfig:
    workdir: str = "demo_work"
    # small: about 190 movie cues and 450 IEMOCAP turns (~45 test utterances per fold).
    scale: Literal["tiny", "small", "medium"] = "small"
    synth: SynthConfig = field(default_factory=SynthConfig)
    # The tiny DenseNet's cosine schedule over 15 epochs: 6 left it at 0.64 FER+ validation accuracy (0.87 at 15) and
    # the visual features worth 46 UAR in the probe against 63 (docs/benchmarks.md). ~1 minute more.
    fer_epochs: int = 15
    # Face tracks at 5 fps instead of the recipe's 10 halve the demo's dominant cost (MTCNN on CPU).
    face_fps: float = 5.0
    # ~125 passes over the ~190 movie cues at batch 16, as the recipe's 40K x 640 are ~128 passes over its ~200K
    # segments (200 steps, 17 passes, left Pretrain+Finetune below Direct: docs/benchmarks.md). ~2 minutes.
    pretrain_steps: int = 1500
    # Self-supervised steps of the tiny wav2vec2 on the movies' audio: a random one keeps little of the prosody.
    audio_steps: int = 1000
    # BERT+Direct finetunes a 6-layer, 384-wide MiniLM: 2.5-5 minutes per session on 2 cores, more than all the
    # other settings together on all ten folds. Left out, the demo tests all ten folds (~460 utterances, each UAR
    # ~2 points of standard error) within 15 minutes; two folds with it tested ~93 (~5 points), too few to order
    # the settings. `make demo-full` adds it, reusing every finished stage and run.
    bert_direct: bool = False


def demo_finetune_config(config: DemoConfig, shards: Path, model_dir: Path, out: Path) -> FinetuneConfig:
    """The demo's finetuning run: configs/finetune/demo_cpu.yaml on its IEMOCAP-layout shards, with BERT+Direct or not."""
    from finetune.config import SETTINGS, FinetuneConfig

    overrides = [f"data.shards={shards}", "data.protocol=iemocap", f"checkpoint={model_dir}", f"out_dir={out}"]
    cfg = load_config(FinetuneConfig, [DEMO_FINETUNE_YAML], overrides)
    if config.bert_direct:
        cfg = replace(cfg, settings=[s for s in SETTINGS if s in cfg.settings or s == "bert_direct"])
    return cfg


def ceilings_summary(corpus: Path, finetune_cfg: FinetuneConfig) -> str:
    """What the generator's cues allow on the finetuned folds' test speakers (Bayes UAR), to read the table against."""
    from finetune.data import load_utterances
    from preprocessing.synth.ceilings import fold_ceilings

    ceilings = fold_ceilings(corpus, load_utterances(finetune_cfg.data.shards, finetune_cfg.data),
                             finetune_cfg.selected_folds)
    pct = lambda uar: f"{100 * uar:.1f}"  # noqa: E731
    return ("   Ceilings (the generator's ground truth): the Bayes-optimal rule's UAR on these test speakers, fold mean\n"
            f"   as in the table: fused {pct(ceilings['uar']['fused'])}, "
            + ", ".join(f"{m} alone {pct(ceilings['uar'][m])}" for m in ("text", "audio", "visual")) + " (chance 25);\n"
            "   fused per fold: " + ", ".join(f"{i}: {pct(c['uar']['fused'])}" for i, c in ceilings["per_fold"].items()))


def _stage(title: str, command: str) -> float:
    print(f"\n== {title} ==\n   $ {command}", flush=True)
    return time.perf_counter()


def _done(start: float, *outputs: Path) -> None:
    for path in outputs:
        print(f"   -> {path}")
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def run_demo(config: DemoConfig) -> None:
    """Generate the corpus, then run each stage on it, printing what each wrote and where."""
    from finetune.run import run_finetune
    from preprocessing.audio_pretrain import AudioPretrainConfig, summary, train_audio_encoder
    from preprocessing.config import PreprocessConfig
    from preprocessing.fer import FerTrainConfig, train_fer
    from preprocessing.pipeline import preprocess
    from preprocessing.synth import generate_corpus
    from pretrain.config import PretrainConfig
    from pretrain.export import export
    from pretrain.train import train

    work = Path(config.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"

    start = _stage("1. synthetic corpus: movies, IEMOCAP, MSP-IMPROV and FER+ layouts", f"memobert synth --out {corpus} --scale {config.scale}")
    if not (corpus / "synth_summary.json").is_file():
        generate_corpus(corpus, SynthConfig(**{**config.synth.__dict__, "scale": config.scale}))
    _done(start, corpus / "movies", corpus / "iemocap", corpus / "msp_improv", corpus / "ferplus")

    fer_ckpt = work / "densenet_fer.pt"
    fer_yaml = CONFIGS / "train_fer/tiny_cpu.yaml"
    start = _stage("2. visual encoder: DenseNet trained on FER+", f"memobert train-fer --fer2013 ... --ferplus ... --out {fer_ckpt} --config {fer_yaml}")
    if not fer_ckpt.is_file():
        report = train_fer(corpus / "ferplus/fer2013.csv", corpus / "ferplus/fer2013new.csv", fer_ckpt,
                           load_config(FerTrainConfig, [fer_yaml], [f"epochs={config.fer_epochs}"]))
        print("   " + " ".join(f"{k}={v:.3f}" for k, v in report.items() if isinstance(v, float)))
    _done(start, fer_ckpt)

    w2v = work / "wav2vec2_ssl"
    start = _stage("3. audio encoder: wav2vec 2.0 trained self-supervised on the movies' audio",
                   f"memobert train-audio --input {corpus / 'movies'} --out {w2v} steps={config.audio_steps}")
    if not (w2v / "config.json").is_file():
        print("   " + summary(train_audio_encoder([corpus / "movies"], w2v, AudioPretrainConfig(steps=config.audio_steps))))
    _done(start, w2v)

    tiny = CONFIGS / "preprocess/tiny_cpu.yaml"
    shards = {"movies": work / "shards/movies", "iemocap": work / "shards/iemocap"}
    for name, source, extra in (("movies", corpus / "movies", []), ("iemocap", corpus / "iemocap", [CONFIGS / "preprocess/labeled.yaml"])):
        start = _stage(f"4. preprocess {name} on Ray (resumable: reruns skip finished videos)",
                       f"memobert preprocess --input {source} --out {shards[name]} --config {tiny} audio.weights={w2v} ...")
        cfg = load_config(PreprocessConfig, [tiny, *extra],
                          [f"visual.weights={fer_ckpt}", f"audio.weights={w2v}", f"face.fps={config.face_fps}"])
        manifest = preprocess(source, shards[name], cfg)
        print(f"   {manifest.num_samples} utterances, dims {manifest.dims}")
        _done(start, shards[name])

    run = work / "pretrain"
    start = _stage("5. pretrain MEmoBERT (tiny flavor, DeepSpeed, four tasks)",
                   f"memobert pretrain --config configs/pretrain/cpu_tiny.yaml data.train_shards={shards['movies']} ...")
    dims = manifest.dims  # the same tiny encoders wrote both shard sets
    pretrain_cfg = load_config(PretrainConfig, [CONFIGS / "pretrain/cpu_tiny.yaml"], [
        f"data.train_shards={shards['movies']}", f"data.val_shards={shards['iemocap']}",
        f"model.acoustic_dim={dims['audio']}", f"model.visual_dim={dims['visual']}", f"train.out_dir={run}",
        f"train.steps={config.pretrain_steps}", f"train.val_every={config.pretrain_steps}", "train.log_every=50",
    ])
    result = train(pretrain_cfg)
    print("   " + " ".join(f"{k}={v:.3g}" for k, v in result.last_metrics.items() if k.startswith("loss/")))
    model_dir = export(run, work / "model")
    _done(start, run / "metrics.jsonl", model_dir)

    finetune_cfg = demo_finetune_config(config, shards["iemocap"], model_dir, work / "finetune")
    names, n_folds = ", ".join(finetune_cfg.settings), len(finetune_cfg.fold_numbers)
    start = _stage(f"6. finetune {names} on the IEMOCAP layout ({n_folds} folds, one seed)",
                   f"memobert finetune --data {shards['iemocap']} --protocol iemocap --checkpoint {model_dir} "
                   f"--config {DEMO_FINETUNE_YAML} --settings {','.join(finetune_cfg.settings)}")
    results = run_finetune(finetune_cfg)
    print("\n" + results.read_text())
    print(ceilings_summary(corpus, finetune_cfg))
    if not config.bert_direct:
        print("   BERT+Direct, the paper's fourth setting (a pretrained 6-layer text BERT), is left out to stay within\n"
              "   15 minutes: `make demo-full` adds it, reusing every finished stage and run (13 to 20 minutes more).")
    _done(start, results)

    print(f"\ndemo finished; everything is under {work}")
