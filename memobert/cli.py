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
    from memobert.demo import DemoConfig
    from preprocessing.config import PreprocessConfig
    from preprocessing.synth.config import SynthConfig
    from pretrain.config import PretrainConfig

    return {"synth": SynthConfig, "demo": DemoConfig, "preprocess": PreprocessConfig, "pretrain": PretrainConfig}


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

    pretrain = sub.add_parser("pretrain", help="MEmoBERT pretraining under DeepSpeed (single process, torchrun or deepspeed)")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment instead.
    pretrain.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    _add_config_args(pretrain)
    pretrain.set_defaults(func=_cmd_pretrain)

    export = sub.add_parser("export", help="a pretraining checkpoint -> a self-contained model folder")
    export.add_argument("checkpoint", help="a run's checkpoints/ folder (latest) or one step_N folder")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_cmd_export)
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
