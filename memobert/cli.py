"""The `memobert` command: one subcommand per stage.

Every config-driven subcommand accepts `--config FILE.yaml` (repeatable, applied in order),
`key=value` overrides and `--print-config` (print the resolved config and exit).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from memobert.config import ConfigError, load_config, to_yaml

log = logging.getLogger("memobert")


def config_classes() -> dict[str, type]:
    """configs/<folder>/*.yaml hold overrides of these classes (imported here, not at start-up:
    a command pays only for the stage it runs)."""
    from finetune.config import FinetuneConfig
    from memobert.demo import DemoConfig
    from preprocessing.config import PreprocessConfig
    from preprocessing.synth.config import SynthConfig
    from preprocessing.fer import FerTrainConfig
    from pretrain.config import PretrainConfig

    return {"synth": SynthConfig, "demo": DemoConfig, "preprocess": PreprocessConfig, "train_fer": FerTrainConfig,
            "pretrain": PretrainConfig, "finetune": FinetuneConfig}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="YAML", help="override file (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def resolve_config(cls: type, args: argparse.Namespace, shortcuts: dict[str, Any] | None = None) -> Any:
    """Defaults <- YAML files <- flag shortcuts (e.g. --seed) <- key=value; exits after --print-config."""
    flags = [f"{key}={value}" for key, value in (shortcuts or {}).items() if value is not None]
    config = load_config(cls, args.config, flags + list(args.overrides))
    if args.print_config:
        print(to_yaml(config), end="")
        raise SystemExit(0)
    return config


def _cmd_synth(args: argparse.Namespace) -> None:
    from preprocessing.synth import generate_corpus
    from preprocessing.synth.config import SynthConfig

    config = resolve_config(SynthConfig, args, {"seed": args.seed, "scale": args.scale})
    summary = generate_corpus(Path(args.out), config)
    print(f"synthetic corpus ({config.scale}, seed {config.seed}) written to {Path(args.out).resolve()}")
    print(summary)


def _cmd_demo(args: argparse.Namespace) -> None:
    from memobert.demo import DemoConfig, run_demo

    config = resolve_config(DemoConfig, args, {"workdir": args.workdir, "scale": args.scale})
    run_demo(config)


def _cmd_preprocess(args: argparse.Namespace) -> None:
    from preprocessing.config import PreprocessConfig

    config = resolve_config(PreprocessConfig, args)
    from preprocessing.pipeline import preprocess

    manifest = preprocess(Path(args.input), Path(args.out), config, ray_address=args.ray_address)
    failures = Path(args.out) / "failures.jsonl"
    print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards under {Path(args.out).resolve()}")
    if failures.is_file():
        print(f"failed units (with reasons): {failures}")


def _cmd_train_fer(args: argparse.Namespace) -> None:
    from preprocessing.fer import FerTrainConfig

    config = resolve_config(FerTrainConfig, args)
    from preprocessing.fer import train_fer

    report = train_fer(Path(args.fer2013), Path(args.ferplus), Path(args.out), config)
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from pretrain.config import PretrainConfig

    config = resolve_config(PretrainConfig, args)
    from pretrain.train import train

    result = train(config)
    print(f"pretraining stopped at step {result.step} ({result.stopped_by}); checkpoint: {result.checkpoint}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pretrain.export import export

    out = export(Path(args.checkpoint), Path(args.out))
    print(f"exported {args.checkpoint} -> {out}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from finetune.config import FinetuneConfig

    shortcuts = {"data.shards": args.data, "data.protocol": args.protocol, "settings": args.settings,
                 "checkpoint": args.checkpoint, "seeds": args.seeds, "folds": args.folds, "out_dir": args.out}
    config = resolve_config(FinetuneConfig, args, shortcuts)
    from finetune.run import run_finetune

    results = run_finetune(config)
    print(results.read_text(), end="")
    print(f"\nresults: {results}")


def _int_list(text: str) -> list[int]:
    """'42,1234' -> [42, 1234] (passed on as a YAML list, so the config sees integers)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memobert", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="generate the synthetic multimodal corpus (movies, IEMOCAP, MSP-IMPROV, FER+ layouts)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, help="shortcut for seed=N")
    synth.add_argument("--scale", help="shortcut for scale=tiny|small|medium")
    _add_config_args(synth)
    synth.set_defaults(func=_cmd_synth)

    demo = sub.add_parser("demo", help="run every stage on a generated corpus and print where the outputs are")
    demo.add_argument("--workdir", help="shortcut for workdir=DIR")
    demo.add_argument("--scale", help="shortcut for scale=tiny|small|medium")
    _add_config_args(demo)
    demo.set_defaults(func=_cmd_demo)

    preprocess = sub.add_parser("preprocess", help="videos or a labeled corpus -> WebDataset shards (Ray)")
    preprocess.add_argument("--input", required=True, help="folder of videos with subtitles, an IEMOCAP / MSP-IMPROV folder or a CSV manifest")
    preprocess.add_argument("--out", required=True, help="output folder (rerun to resume)")
    preprocess.add_argument("--ray-address", help="a running Ray cluster (default: a local one)")
    _add_config_args(preprocess)
    preprocess.set_defaults(func=_cmd_preprocess)

    train_fer = sub.add_parser("train-fer", help="train the DenseNet-BC-100 FER+ face encoder")
    train_fer.add_argument("--fer2013", required=True, help="fer2013.csv")
    train_fer.add_argument("--ferplus", required=True, help="fer2013new.csv (FER+ votes)")
    train_fer.add_argument("--out", required=True, help="checkpoint file to write")
    _add_config_args(train_fer)
    train_fer.set_defaults(func=_cmd_train_fer)

    pretrain = sub.add_parser("pretrain", help="MEmoBERT pretraining under DeepSpeed (single process, torchrun or deepspeed)")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment instead.
    pretrain.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    _add_config_args(pretrain)
    pretrain.set_defaults(func=_cmd_pretrain)

    export = sub.add_parser("export", help="a pretraining checkpoint -> a self-contained model folder")
    export.add_argument("checkpoint", help="a run's checkpoints/ folder (latest) or one step_N folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_cmd_export)

    finetune = sub.add_parser("finetune", help="the downstream settings over CV folds and seeds -> results table")
    finetune.add_argument("--data", help="shortcut for data.shards=DIR (labeled shards)")
    finetune.add_argument("--protocol", help="shortcut for data.protocol=iemocap|msp_improv")
    finetune.add_argument("--settings", help="shortcut for settings=direct,bert_direct,pretrain_finetune,pretrain_prompt")
    finetune.add_argument("--checkpoint", help="shortcut for checkpoint=DIR (an export or a DeepSpeed run/checkpoint)")
    finetune.add_argument("--seeds", type=_int_list, help="shortcut for seeds=42,1234,...")
    finetune.add_argument("--folds", type=_int_list, help="shortcut for folds=1,2,... (1-based; default all)")
    finetune.add_argument("--out", help="shortcut for out_dir=DIR")
    _add_config_args(finetune)
    finetune.set_defaults(func=_cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `memobert` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Callable[[argparse.Namespace], None] = args.func
    try:
        handler(args)
    except ConfigError as err:
        print(f"memobert {args.command}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
