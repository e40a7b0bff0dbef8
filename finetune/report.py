"""Run records -> results.md (paper-style tables), results.csv, missing_modalities.csv, confusion PNGs.

Every number is the mean over folds per seed, then mean +- sample std over seeds (finetune.metrics.aggregate).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from finetune.metrics import Summary, aggregate, fold_mean_se, uar_test_se
from finetune.protocols import CLASSES, TEST_SELECTED, folds_for

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig

SETTING_NAMES = {
    "direct": "Direct",
    "bert_direct": "BERT+Direct",
    "pretrain_finetune": "Pretrain+Finetune",
    "pretrain_prompt": "Pretrain+Prompt",
    "mfn": "MFN",
    "m3er": "M3ER",
    "probe": "Probe (logistic regression)",
}
# What each setting takes from a text BERT (its run records name which one: finetune.settings.text_model).
TEXT_MODEL_USE = {
    "bert_direct": "starts from",
    "mfn": "takes its word embeddings from",
    "m3er": "takes its word embeddings from",
}
METRICS = ("wa", "uar", "wf1")
# The missing-modality table's columns: single modalities first, the full input last.
TABLE_SUBSETS = ("t", "a", "v", "ta", "tv", "av", "tav")


def subset_name(subset: str) -> str:
    """"ta" -> "T+A"."""
    return "+".join(m.upper() for m in subset)


def subset_scores(record: dict[str, Any], subset: str) -> dict[str, float]:
    """A run's test scores with only `subset` of the modalities given."""
    return record["scores"] if subset == "tav" else record["missing_modalities"][subset]["scores"]


def summarize(records: Sequence[dict[str, Any]], setting: str, subset: str = "tav") -> dict[str, Summary]:
    """Per metric: fold means per seed, then mean and std over seeds, for one setting and modality subset."""
    per_seed: dict[str, dict[int, list[float]]] = {m: defaultdict(list) for m in METRICS}
    for record in records:
        if record["setting"] == setting:
            values = subset_scores(record, subset)
            for metric in METRICS:
                per_seed[metric][record["seed"]].append(values[metric])
    return {metric: aggregate(dict(per_seed[metric])) for metric in METRICS}


def uar_se(records: Sequence[dict[str, Any]], setting: str) -> float:
    """The setting's UAR standard error from its test utterances alone (finetune.metrics.fold_mean_se)."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for record in records:
        if record["setting"] == setting:
            # Records written before runs stored their support: the confusion rows (short only by NOT_A_CLASS).
            support = record.get("support") or np.sum(record["confusion"], 1)
            per_seed[record["seed"]].append(uar_test_se(np.array(record["confusion"]), support))
    return fold_mean_se(dict(per_seed))


def write_report(out_dir: Path, cfg: FinetuneConfig, records: Sequence[dict[str, Any]]) -> Path:
    """Write the tables, CSVs and confusion PNGs under out_dir; returns results.md."""
    from finetune.config import CLASSIFIER_HEAD_SETTINGS  # not at module level: the config import costs ~1 s

    out_dir = Path(out_dir)
    settings = list(cfg.settings)
    full = {s: summarize(records, s) for s in settings}
    missing = {(s, sub): summarize(records, s, sub) for s in settings for sub in TABLE_SUBSETS}
    _write_csv(out_dir / "results.csv", {(s, "tav"): full[s] for s in settings})
    _write_csv(out_dir / "missing_modalities.csv", missing)
    pngs = {s: plot_confusion(records, s, out_dir / "confusion" / f"{s}.png") for s in settings}

    n_folds = len(folds_for(cfg.data.protocol))
    folds = cfg.fold_numbers
    fold_text = f"all {n_folds} folds" if len(folds) == n_folds else f"folds {_join(folds)} of {n_folds} (partial)"
    lines = [
        f"# {title(cfg.data.protocol)}",
        "",
        f"{len(CLASSES)} classes ({', '.join(CLASSES)}); {fold_text}; seeds {_join(cfg.seeds)}.",
        label_fraction_text(cfg.data.label_fraction),
        selection_text(cfg.data.protocol),
        "Mean over folds per seed, then mean ± std over seeds, in %; std is the sample standard deviation over "
        "seeds (ddof=1), as papers report it (none with a single seed). UAR SE (test): the UAR's standard error "
        "from the sample of test utterances alone (each class's recall a binomial proportion, folds independent, "
        "mean over seeds): how far the UAR would move on as many other test utterances, the trained models held "
        "fixed; seeds add their own spread (the std).",
        "",
        "| Setting | WA | UAR | WF1 | UAR SE (test) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {SETTING_NAMES[s]} | " + " | ".join(_pm(full[s][m]) for m in METRICS)
              + f" | {100 * uar_se(records, s):.2f} |" for s in settings]
    notes = text_model_notes(records, settings)
    if "pretrain_prompt" in settings:
        notes.append(prompt_scoring_note(cfg.prompt.scoring, records))
    if "probe" in settings:
        notes.append(PROBE_NOTE)
    if cfg.model.classifier_pooling == "mean" and set(settings) & set(CLASSIFIER_HEAD_SETTINGS):
        notes.append(MEAN_POOLING_NOTE)
    if notes:
        lines += ["", " ".join(notes)]
    lines += [
        "",
        "## Missing modalities (beyond the paper)",
        "",
        "UAR (%) on the test speaker when only the listed modalities are given (the others empty: no frames, "
        "text reduced to [CLS] [SEP] plus the prompt template; MFN and M3ER see zeros and an absent flag, "
        "M3ER then proxies from the given ones), same trained models. All metrics: missing_modalities.csv.",
        "",
        "| Setting | " + " | ".join(subset_name(sub) for sub in TABLE_SUBSETS) + " |",
        "|---|" + "---|" * len(TABLE_SUBSETS),
    ]
    lines += [
        f"| {SETTING_NAMES[s]} | " + " | ".join(_pm(missing[s, sub]["uar"]) for sub in TABLE_SUBSETS) + " |"
        for s in settings
    ]
    lines += ["", "## Confusion matrices (test speakers, summed over folds and seeds)", ""]
    lines += [f"![{SETTING_NAMES[s]}]({path.relative_to(out_dir).as_posix()})" for s, path in pngs.items()]
    path = out_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


MEAN_POOLING_NOTE = ("The classifier head of Direct, BERT+Direct and Pretrain+Finetune reads the mean of all valid "
                     "text, visual and acoustic states (model.classifier_pooling=mean), not [CLS] as the authors' "
                     "does (beyond the paper).")

PROBE_NOTE = ("Probe: a logistic regression per modality on pooled features (text: the bag of token ids; "
              "audio and visual: mean and std over frames), its C chosen by the validation speaker's log-loss; "
              "its T, A and V columns below say how much of the class each modality of the shards carries, and a "
              "subset of several adds its probes' log-probabilities (late fusion, nothing learned across modalities).")


def label_fraction_text(fraction: float) -> str:
    """Which labels the training speakers gave: all, or a seeded per-class share."""
    if fraction >= 1.0:
        return "Every labeled utterance of the training speakers trains (label fraction 1.0)."
    return (f"Label fraction {fraction:g}: a share of {100 * fraction:g}% of the training speakers' utterances, drawn "
            f"per class and seed, trains; validation and test speakers keep all of theirs.")


def title(protocol: str) -> str:
    """The results title; a protocol that selects on the test speaker says so in it."""
    if protocol in TEST_SELECTED:
        return f"Finetuning results: {protocol} (test-selected, not a clean estimate)"
    return f"Finetuning results: {protocol}"


def selection_text(protocol: str) -> str:
    """How the reported weights were chosen."""
    if protocol in TEST_SELECTED:
        return ("The authors' protocol: the other 11 speakers train and the test speaker also validates, so model "
                "selection and early stopping saw the test speaker: scores are optimistic, not comparable to the "
                "leak-free msp_improv protocol.")
    return ("Model selection and early stopping on the validation speaker; the test speaker is evaluated once, "
            "with the selected weights.")


def prompt_scoring_note(scoring: str, records: Sequence[dict[str, Any]]) -> str:
    """Which prediction rule the Pretrain+Prompt rows used, and how often the vocab rule hit a non-label word."""
    if scoring == "label_words":
        return "Pretrain+Prompt predicts the best of the label words at [MASK] (label-words-only scoring)."
    runs = [r for r in records if r["setting"] == "pretrain_prompt"]
    missed = sum(r.get("not_a_class", 0) for r in runs)
    tested = sum(r["num_predictions"] for r in runs)
    return (f"Pretrain+Prompt predicts the argmax over the whole vocabulary at [MASK], as the authors score it: "
            f"a word that is no label word counts as wrong ({missed} of {tested} test predictions).")


def text_model_notes(records: Sequence[dict[str, Any]], settings: Sequence[str]) -> list[str]:
    """One sentence per setting built on a text BERT, naming the one its runs started from and its shape."""
    notes = []
    for setting in settings:
        if setting not in TEXT_MODEL_USE:
            continue
        # Records written before runs named their text model have none to show.
        models = sorted({_text_model_name(r["text_model"]) for r in records
                         if r["setting"] == setting and r.get("text_model")})
        if models:
            paper = " (the paper's: bert-base-uncased, layers 12, hidden 768)" if setting == "bert_direct" else ""
            notes.append(f"{SETTING_NAMES[setting]} {TEXT_MODEL_USE[setting]} {', '.join(models)}{paper}.")
    return notes


def _text_model_name(model: dict[str, Any]) -> str:
    """E.g. "MiniLM-L6-H384-uncased (layers 6, hidden 384)"; the shape only where the folder's config.json gave it."""
    if model["layers"] is None or model["hidden"] is None:
        return model["name"]
    return f"{model['name']} (layers {model['layers']}, hidden {model['hidden']})"


def plot_confusion(records: Sequence[dict[str, Any]], setting: str, path: Path) -> Path:
    """One setting's test confusion matrix summed over its runs, as a PNG (counts, colour = row share)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

    runs = [r for r in records if r["setting"] == setting]
    counts = np.sum([np.asarray(r["confusion"]) for r in runs], axis=0)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{SETTING_NAMES[setting]} ({len(runs)} runs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _write_csv(path: Path, table: dict[tuple[str, str], dict[str, Summary]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "modalities", "seeds", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
        for (setting, subset), summary in table.items():
            stats = [f"{v:.6f}" for m in METRICS for v in (summary[m].mean, summary[m].std)]
            writer.writerow([setting, subset_name(subset), len(summary["uar"].per_seed), *stats])


def _pm(summary: Summary) -> str:
    if math.isnan(summary.std):  # a single seed has no sample std
        return f"{100 * summary.mean:.2f}"
    return f"{100 * summary.mean:.2f} ± {100 * summary.std:.2f}"


def _join(values: Sequence[int]) -> str:
    return ", ".join(map(str, values))
