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
    from preprocessing.audio_pretrain import AudioPretrainConfig
    from preprocessing.fer import FerTrainConfig
    from pretrain.config import PretrainConfig
    from slurm.cluster import SlurmProfile

    return {"synth": SynthConfig, "demo": DemoConfig, "preprocess": PreprocessConfig, "train_fer": FerTrainConfig,
            "train_audio": AudioPretrainConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "slurm": SlurmProfile}


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


def _cmd_train_audio(args: argparse.Namespace) -> None:
    from preprocessing.audio_pretrain import AudioPretrainConfig, summary, train_audio_encoder

    report = train_audio_encoder([Path(p) for p in args.input], Path(args.out), resolve_config(AudioPretrainConfig, args))
    print(f"{args.out}: {summary(report)}")


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

    config = resolve_config(FinetuneConfig, args, _finetune_shortcuts(args))
    from finetune.run import run_finetune

    results = run_finetune(config)
    print(results.read_text(), end="")
    print(f"\nresults: {results}")


def _cmd_submit(args: argparse.Namespace) -> None:
    """`memobert submit STAGE`: the stage's config and a cluster profile -> Slurm job(s), or their scripts (--dry-run)."""
    import shlex

    profile = _slurm_profile(args)
    command = shlex.join(["memobert", *sys.argv[1:]])  # recorded in <run>/slurm/job.json
    from slurm import submit

    if args.stage == "pretrain":
        from pretrain.config import PretrainConfig

        config = resolve_config(PretrainConfig, args)
        submitted = submit.submit_pretrain(config, profile, dry_run=args.dry_run, command=command)
    elif args.stage == "finetune":
        from finetune.config import FinetuneConfig

        config = resolve_config(FinetuneConfig, args, _finetune_shortcuts(args))
        submitted = submit.submit_finetune(config, profile, dry_run=args.dry_run, command=command)
    else:
        from preprocessing.config import PreprocessConfig

        config = resolve_config(PreprocessConfig, args)
        submitted = submit.submit_preprocess(Path(args.input), Path(args.out), config, profile, dry_run=args.dry_run,
                                             command=command)
    if args.dry_run:
        for role, script in submitted.scripts.items():
            print(f"# ---- sbatch script: {role} (not submitted)\n{script}")
        print(f"# ---- resolved {args.stage} config\n{to_yaml(config)}", end="")
    if submitted.note:
        print(submitted.note)
    if args.wait and submitted.final is not None:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            result = submit.wait_for(submitted.final)
        except (FailedJobError, UncompletedJobError) as err:  # the job's traceback, or where its log is
            print(f"memobert submit {args.stage}: {err}", file=sys.stderr)
            raise SystemExit(1) from err
        _print_submit_result(args, result)


def _slurm_profile(args: argparse.Namespace) -> Any:
    """Profile defaults <- --profile files <- the flags named like its fields."""
    from dataclasses import replace

    from slurm.cluster import SlurmProfile, parse_time

    flags = {key: getattr(args, key) for key in SLURM_FLAGS if getattr(args, key, None) is not None}
    if args.time is not None:
        flags["time_min"] = parse_time(args.time)
    profile = replace(load_config(SlurmProfile, args.profile), **flags)
    profile.validate()
    return profile


def _print_submit_result(args: argparse.Namespace, result: Any) -> None:
    if args.stage == "pretrain":
        print(f"pretraining stopped at step {result.step} ({result.stopped_by}); checkpoint: {result.checkpoint}")
    elif args.stage == "finetune":
        print(Path(result).read_text(), end="")
        print(f"\nresults: {result}")
    else:
        print(f"{result['samples']} samples in {result['shards']} shards under {Path(args.out).resolve()}")


def _finetune_shortcuts(args: argparse.Namespace) -> dict[str, Any]:
    return {"data.shards": args.data, "data.protocol": args.protocol, "settings": args.settings,
            "checkpoint": args.checkpoint, "seeds": args.seeds, "folds": args.folds, "out_dir": args.out}


def _add_finetune_shortcuts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="shortcut for data.shards=SOURCE (labeled shards: folder, pattern, URL or pipe:)")
    parser.add_argument("--protocol", help="shortcut for data.protocol=iemocap|msp_improv|msp_improv_11to1")
    parser.add_argument("--settings", help="shortcut for settings=direct,bert_direct,pretrain_finetune,pretrain_prompt (also mfn, m3er, probe)")
    parser.add_argument("--checkpoint", help="shortcut for checkpoint=DIR (an export or a DeepSpeed run/checkpoint)")
    parser.add_argument("--seeds", type=_int_list, help="shortcut for seeds=42,1234,...")
    parser.add_argument("--folds", type=_int_list, help="shortcut for folds=1,2,... (1-based; default all)")
    parser.add_argument("--out", help="shortcut for out_dir=DIR")


# Flags of `memobert submit` that override the cluster profile's field of the same name.
SLURM_FLAGS = ("partition", "account", "qos", "constraint", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
               "mem", "exclusive", "array_parallelism")


def _add_slurm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Slurm (each flag overrides the --profile field of the same name)")
    group.add_argument("--profile", action="append", default=[], metavar="YAML",
                       help="cluster profile, e.g. configs/slurm/generic_gpu.yaml (repeatable)")
    group.add_argument("--nodes", type=int)
    group.add_argument("--gpus-per-node", type=int)
    group.add_argument("--tasks-per-node", type=int, help="default: one per GPU, 1 on nodes without GPUs")
    group.add_argument("--cpus-per-task", type=int)
    group.add_argument("--mem", help="memory per node, sbatch syntax (64G; 0: all)")
    group.add_argument("--time", help="time limit: minutes, H:M:S or D-H:M:S")
    group.add_argument("--partition")
    group.add_argument("--account")
    group.add_argument("--qos")
    group.add_argument("--constraint", help="node features, e.g. 'h100|a100'")
    group.add_argument("--exclusive", action="store_true", default=None, help="whole nodes")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and the resolved config; submit nothing")
    group.add_argument("--wait", action="store_true", help="wait for the run's end and print its result")


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

    train_audio = sub.add_parser("train-audio", help="self-supervised wav2vec 2.0 training of an audio encoder on unlabeled audio")
    train_audio.add_argument("--input", required=True, action="append", help="a folder of videos / audio files, or a file (repeatable)")
    train_audio.add_argument("--out", required=True, help="HF model folder to write (audio.weights of preprocess)")
    _add_config_args(train_audio)
    train_audio.set_defaults(func=_cmd_train_audio)

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
    _add_finetune_shortcuts(finetune)
    _add_config_args(finetune)
    finetune.set_defaults(func=_cmd_finetune)

    submit = sub.add_parser("submit", help="pretrain, finetune or preprocess as Slurm jobs (submitit)")
    stages = submit.add_subparsers(dest="stage", required=True, metavar="STAGE")
    submit_pretrain = stages.add_parser("pretrain", help="one multi-node job, one rank per GPU; requeued at the time limit")
    submit_finetune = stages.add_parser("finetune", help="a job array over settings x seeds x folds, then a report job")
    _add_finetune_shortcuts(submit_finetune)
    submit_finetune.add_argument("--array-parallelism", type=int, help="at most this many runs at once")
    submit_preprocess = stages.add_parser("preprocess", help="a Ray cluster over the job's tasks runs `preprocess`")
    submit_preprocess.add_argument("--input", required=True, help="as for `memobert preprocess`")
    submit_preprocess.add_argument("--out", required=True, help="output folder (resubmit to resume)")
    for stage in (submit_pretrain, submit_finetune, submit_preprocess):
        _add_slurm_args(stage)
        _add_config_args(stage)
        stage.set_defaults(func=_cmd_submit)
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
