"""Linear evaluation: what a logistic regression reads from a frozen encoder, beside the same shape at random init.

A reference for finetuning. Each checkpoint encodes every labeled utterance once (full input, eval mode, no
gradient); per fold, a logistic regression on the [CLS] state and one on each modality's mean hidden state
(text, audio, visual positions: each has attended to every modality), the latter three fused late (their
log-probabilities added), each C chosen by the probe setting's rule (class-balanced validation log-loss). The
folds, label fractions and their draws are finetuning's (`fold_data`), so the figures sit beside results.md's:
a finetuned setting below the readout of the weights it started from has lost signal that its start held.
"random init" is Direct's start: the first checkpoint's shape, initialised as finetune's `direct` does. Every
figure is a mean over the seeds (a checkpoint at 1.0 draws nothing: one fit).

    PYTHONPATH=. .venv/bin/python benchmarks/linear_eval.py --shards SHARDS --checkpoint MODEL [--checkpoint ...]
        [--fractions 0.1,1.0] [--seeds "[42,43,44,45,46]"] [--folds "[]"] [--out linear_eval.json]

After `benchmarks/learning.py --out OUT`: --shards OUT/shards/iemocap --checkpoint OUT/model (and
OUT/pretrain_seed_N/model for further pretraining seeds).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config import FinetuneConfig
from finetune.data import batches, labels_of
from finetune.metrics import scores
from finetune.probe import fit_by_log_loss
from finetune.protocols import CLASSES
from finetune.run import Context, fold_data, load_context
from finetune.settings import build_model, masked_mean
from memobert.config import load_config
from pretrain.export import load_model
from pretrain.model import MEmoBERT

READOUTS = ("cls", "t", "a", "v", "late")
RANDOM_INIT = "random init"


@torch.no_grad()
def encoded_features(encoder: MEmoBERT, ctx: Context, cfg: FinetuneConfig) -> dict[str, np.ndarray]:
    """Per utterance, in ctx.utts' order: the [CLS] state and the mean hidden state of each modality's positions,
    encoded on ctx.device (finetune's train.device: the GPU where there is one)."""
    encoder.to(ctx.device).eval()
    out: dict[str, list[torch.Tensor]] = {"cls": [], "t": [], "a": [], "v": []}
    for batch in batches(ctx.utts, 64, cfg.data, ctx.tokenizer.cls_id, ctx.tokenizer.sep_id):
        batch = batch.to(ctx.device)
        encoded = encoder.encode(batch)
        out["cls"].append(encoded.cls)
        for name, hidden, mask in (("t", encoded.text, batch.text_mask), ("a", encoded.acoustic, batch.acoustic_mask),
                                   ("v", encoded.visual, batch.visual_mask)):
            out[name].append(masked_mean(hidden, mask))  # an empty track averages to zeros
    return {name: torch.cat(parts).double().cpu().numpy() for name, parts in out.items()}


def readout_uar(features: dict[str, np.ndarray], ctx: Context, cfg: FinetuneConfig, seed: int) -> dict[str, float]:
    """Test UAR of each readout, mean over folds; the training speakers' labels drawn as finetune draws them."""
    row = {u.key: i for i, u in enumerate(ctx.utts)}
    per_fold: dict[str, list[float]] = {name: [] for name in READOUTS}
    for fold in cfg.selected_folds:
        data = fold_data(fold, seed, cfg, ctx)
        index = {part: [row[u.key] for u in getattr(data, part)] for part in ("train", "val", "test")}
        y = {part: labels_of(getattr(data, part)) for part in index}
        fused = 0.0
        for name in ("cls", "t", "a", "v"):
            x = {part: features[name][rows] for part, rows in index.items()}
            mean, std = x["train"].mean(0), x["train"].std(0) + 1e-8
            x = {part: (values - mean) / std for part, values in x.items()}
            probe, _, _ = fit_by_log_loss(x["train"], y["train"], x["val"], y["val"])
            log_proba = probe.predict_log_proba(x["test"])
            per_fold[name].append(scores(y["test"], probe.classes_[log_proba.argmax(1)], len(CLASSES))["uar"])
            if name != "cls":
                fused = fused + log_proba
        per_fold["late"].append(scores(y["test"], probe.classes_[fused.argmax(1)], len(CLASSES))["uar"])
    return {name: float(np.mean(values)) for name, values in per_fold.items()}


def fraction_scores(features_of: Callable[[int], dict[str, np.ndarray]], ctx: Context, cfg: FinetuneConfig,
                    fractions: Sequence[float], seeds: Sequence[int], seeded_features: bool) -> dict[str, dict[str, float]]:
    """{fraction: {readout: UAR}}, each the mean over seeds of the readouts of features_of(seed); where neither the
    features nor the labels depend on the seed (a fixed encoder, all labels), the first seed stands for all."""
    out = {}
    for fraction in fractions:
        fraction_cfg = replace(cfg, data=replace(cfg.data, label_fraction=fraction))
        draws = seeds if seeded_features or fraction < 1.0 else seeds[:1]
        runs = [readout_uar(features_of(seed), ctx, fraction_cfg, seed) for seed in draws]
        out[str(fraction)] = {r: float(np.mean([run[r] for run in runs])) for r in READOUTS}
    return out


def random_init(ctx: Context, cfg: FinetuneConfig, like: MEmoBERT, seed: int) -> MEmoBERT:
    """Direct's start for this seed: `like`'s shape, initialised by finetune's own model builder."""
    torch.manual_seed(seed)
    return build_model("direct", cfg, ctx.dims, ctx.tokenizer, like).backbone


def evaluate(checkpoints: dict[str, MEmoBERT], ctx: Context, cfg: FinetuneConfig, fractions: Sequence[float],
             seeds: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{RANDOM_INIT or checkpoint name: {fraction: {readout: UAR}}}, means over seeds: a seed draws the labels
    of a fraction below 1 and, for the random init, the initialisation, as Direct's seed does."""
    first = next(iter(checkpoints.values()))
    random_features = cache(lambda seed: encoded_features(random_init(ctx, cfg, first, seed), ctx, cfg))
    result = {RANDOM_INIT: fraction_scores(random_features, ctx, cfg, fractions, seeds, seeded_features=True)}
    for name, checkpoint in checkpoints.items():
        features = encoded_features(checkpoint, ctx, cfg)
        result[name] = fraction_scores(lambda _: features, ctx, cfg, fractions, seeds, seeded_features=False)
    return result


def table(result: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per encoder and label fraction, one column per readout (UAR %)."""
    lines = [f"{'encoder':<40}{'labels':>8}" + "".join(f"{r:>8}" for r in READOUTS)]
    for name, by_fraction in result.items():
        for fraction, uar in by_fraction.items():
            lines.append(f"{name:<40}{fraction:>8}" + "".join(f"{100 * uar[r]:8.2f}" for r in READOUTS))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="labeled shards (IEMOCAP layout)")
    parser.add_argument("--checkpoint", action="append", required=True, help="an exported model folder (repeatable)")
    parser.add_argument("--fractions", default="0.1,1.0", help="label fractions of the training speakers")
    parser.add_argument("--seeds", default="[42,43,44,45,46]",
                        help="finetuning seeds: the label fractions' draws and the random init's")
    parser.add_argument("--folds", default="[]", help="IEMOCAP folds; [] = all 10")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.seeds = [int(s) for s in json.loads(args.seeds)]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(FinetuneConfig, overrides=[f"data.shards={args.shards}", "data.protocol=iemocap",
                                                 f"checkpoint={args.checkpoint[0]}", f"folds={args.folds}"])
    ctx = load_context(cfg, needs_checkpoint=False)
    checkpoints = {str(Path(folder)): load_model(Path(folder)) for folder in args.checkpoint}
    result = evaluate(checkpoints, ctx, cfg, args.fractions, args.seeds)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
