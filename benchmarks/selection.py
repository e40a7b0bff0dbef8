"""What model selection on one validation speaker costs: the test speakers' UAR at every validation.

Trains a setting's folds as `memobert finetune` does (the same config, seed and paired trainings) for the
whole schedule, and at each validation scores the validation speakers and, for each modality subset, the
test speakers: they are extra validation sets of finetune's own `train_and_select`, and a validation never
changes the training, so the trajectory is the finetuning run's. The recipe's selection (the best
validation UAR, stopped after `train.patience` validations without a better one) is replayed on each
validation history, so the test UAR at the selected step is what `memobert finetune` reports for the fold.
Prints, per modality subset and averaged over folds, the test UAR at the selected step, at the best
validation of the whole schedule (no early stop), at the last step, and at the best test step (an oracle,
for scale only), then the mean test curve; writes every fold's curves to --out.

    PYTHONPATH=. .venv/bin/python benchmarks/selection.py --setting pretrain_finetune --out selection.json \
        data.shards=SHARDS checkpoint=MODEL "folds=[]" [--config configs/finetune/demo_cpu.yaml] [KEY=VALUE ...]

(the demo config's folds are 1 and 2; "folds=[]" runs every fold of the protocol.)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finetune.config import CHECKPOINT_SETTINGS, FinetuneConfig
from finetune.data import MODALITY_SUBSETS, keep_modalities
from finetune.run import (
    build_and_prepare,
    check_ready,
    device_for,
    fold_data,
    load_context,
    resolve_precision,
    shares_training,
    train_and_select,
    trainings,
)
from finetune.settings import schedule_for
from memobert.config import load_config

NO_EARLY_STOP = 10**9


def replay(history: Sequence[dict[str, float]], patience: int) -> int:
    """The step finetuning selects from a validation history: the first best UAR, the search stopped after
    `patience` validations without a better one."""
    step, best, stale = history[0]["step"], -1.0, 0
    for entry in history:
        if entry["val_uar"] > best:
            step, best, stale = entry["step"], entry["val_uar"], 0
        else:
            stale += 1
            if stale >= patience:
                break
    return int(step)


def fold_curves(setting: str, seed: int, cfg: FinetuneConfig, subsets: Sequence[str]) -> list[dict[str, Any]]:
    """Per fold: the validation steps, the validation and test UARs at each, and the steps selections pick."""
    if not shares_training(setting):
        raise ValueError(f"{setting}: only settings whose fit-time hook never reads the validation speaker")
    ctx = load_context(cfg, needs_checkpoint=bool(cfg.checkpoint) and setting in CHECKPOINT_SETTINGS)
    records = []
    for _, _, folds in trainings([(setting, seed, f) for f in cfg.fold_numbers], cfg.data.protocol):
        datas = [fold_data(fold, seed, cfg, ctx) for fold in folds]
        model, _ = build_and_prepare(setting, seed, folds[0], datas[0], cfg, ctx)
        sets = [d.val for d in datas] + [keep_modalities(d.test, s) for d in datas for s in subsets]
        patient = replace(cfg, train=replace(cfg.train, patience=NO_EARLY_STOP))
        selections = train_and_select(model, datas[0].train, sets, patient, seed, ctx, schedule_for(setting, cfg),
                                      desc=f"{setting} s{seed} f{'+'.join(str(f.index) for f in folds)}")
        for i, fold in enumerate(folds):
            val = selections[i].history
            tests = selections[len(folds) + i * len(subsets):len(folds) + (i + 1) * len(subsets)]
            records.append({
                "fold": fold.index, "steps": [h["step"] for h in val], "val_uar": [h["val_uar"] for h in val],
                "test_uar": {s: [h["val_uar"] for h in t.history] for s, t in zip(subsets, tests)},
                "selected_step": replay(val, cfg.train.patience), "best_val_step": replay(val, NO_EARLY_STOP)})
    return records


def summary(records: Sequence[dict[str, Any]], subsets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per subset, the mean test UAR over folds at the selected step, the best validation, the last step, the
    best test step."""
    out = {}
    for s in subsets:
        at = {"selected": [], "best_val": [], "last": [], "oracle": []}
        for r in records:
            curve = dict(zip(r["steps"], r["test_uar"][s]))
            at["selected"].append(curve[r["selected_step"]])
            at["best_val"].append(curve[r["best_val_step"]])
            at["last"].append(r["test_uar"][s][-1])
            at["oracle"].append(max(r["test_uar"][s]))
        out[s] = {k: float(np.mean(v)) for k, v in at.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="pretrain_finetune")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--subsets", default=",".join(MODALITY_SUBSETS), help="modality subsets of the test speakers")
    parser.add_argument("--config", default="configs/finetune/demo_cpu.yaml")
    parser.add_argument("--out", type=Path, required=True, help="JSON with every fold's curves")
    parser.add_argument("overrides", nargs="*", help="finetuning config KEY=VALUE")
    args = parser.parse_args()
    subsets = args.subsets.split(",")
    cfg = load_config(FinetuneConfig, [Path(args.config)], args.overrides)
    check_ready(cfg)
    cfg = resolve_precision(cfg, cuda=device_for(cfg).type == "cuda")
    records = fold_curves(args.setting, args.seed, cfg, subsets)
    result = {"setting": args.setting, "seed": args.seed, "summary": summary(records, subsets), "folds": records}
    args.out.write_text(json.dumps(result, indent=1))
    selected = [r["selected_step"] for r in records]
    print(f"{args.setting}, seed {args.seed}, folds {[r['fold'] for r in records]}; selected steps {selected}")
    print(f"{'test UAR %':<28}" + "".join(f"{s.upper():>7}" for s in subsets))
    for key, name in (("selected", "selected (as finetune)"), ("best_val", "best validation, no stop"),
                      ("last", "last step"), ("oracle", "best test step (oracle)")):
        print(f"{name:<28}" + "".join(f"{100 * result['summary'][s][key]:7.1f}" for s in subsets))
    steps = records[0]["steps"]
    if all(r["steps"] == steps for r in records):
        print("mean test curve, by step:")
        for j, step in enumerate(steps):
            print(f"  {step:>5}" + "".join(f"{100 * np.mean([r['test_uar'][s][j] for r in records]):7.1f}"
                                           for s in subsets))


if __name__ == "__main__":
    main()
