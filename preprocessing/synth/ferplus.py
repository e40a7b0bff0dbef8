"""FER2013 + FER+ style files of 48x48 grey face crops showing the synthetic expressions.

OUT/ferplus/fer2013.csv      emotion,pixels,Usage (FER2013's 7 codes; 2304 space-separated grey values)
OUT/ferplus/fer2013new.csv   Usage,Image name,neutral,...,contempt,unknown,NF: 10 taggers' votes per row,
                             row-aligned with fer2013.csv; NF=10 rows (no face) have an empty name.
Rows are Training, then PublicTest, then PrivateTest (80/10/10), as in the release. Each split has all
eight classes; some rows are unknown-dominated (a faint or blurred face) and a few are not faces.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

from .common import Progress, item_rng, write_json
from .config import Sizes, SynthConfig
from .faces import FER_CLASSES, build_face, crop_grey, random_identity, render_expression
from .video import background

SIZE = 48
COLUMNS = FER_CLASSES + ("unknown", "NF")
FER2013_CODE = {"anger": 0, "disgust": 1, "fear": 2, "happiness": 3, "sadness": 4, "surprise": 5, "neutral": 6,
                "contempt": 1}  # FER2013 has no contempt; its closest code
SPLITS = (("Training", 0.8), ("PublicTest", 0.1), ("PrivateTest", 0.1))
MAIN = ("neutral", "happiness", "sadness", "anger")  # the four target classes
CONFUSABLE = {  # where a tagger's minority vote tends to go
    "neutral": ("sadness", "contempt"), "happiness": ("neutral", "surprise"), "surprise": ("fear", "happiness"),
    "sadness": ("neutral", "fear"), "anger": ("disgust", "contempt"), "disgust": ("anger", "contempt"),
    "fear": ("surprise", "sadness"), "contempt": ("neutral", "disgust"),
}


def generate_ferplus(out: Path, config: SynthConfig, sizes: Sizes, progress: Progress) -> dict[str, int]:
    """Write both CSVs; returns counts."""
    plan = _plan(item_rng(config.seed, "ferplus", "plan"), sizes.ferplus_rows)
    folder = out / "ferplus"
    folder.mkdir(parents=True, exist_ok=True)
    truth = []
    with open(folder / "fer2013.csv", "w", newline="") as old, open(folder / "fer2013new.csv", "w", newline="") as new:
        old_csv, new_csv = csv.writer(old, lineterminator="\n"), csv.writer(new, lineterminator="\n")
        old_csv.writerow(["emotion", "pixels", "Usage"])
        new_csv.writerow(["Usage", "Image name", *COLUMNS])
        for i, (usage, kind, shown) in enumerate(progress(plan, "ferplus")):
            rng = item_rng(config.seed, "ferplus", i)
            pixels = _image(rng, kind, shown)
            votes = _votes(rng, kind, shown)
            code = FER2013_CODE[shown] if kind != "nf" else int(rng.integers(7))
            old_csv.writerow([code, " ".join(map(str, pixels.ravel())), usage])
            new_csv.writerow([usage, "" if kind == "nf" else f"fer{i:07d}.png", *votes])
            truth.append({"row": i, "kind": kind, "expression": shown if kind != "nf" else None})
    write_json(out / "ground_truth" / "ferplus" / "rows.json", truth)
    return {"ferplus_rows": len(plan)}


def _plan(rng: np.random.Generator, rows: int) -> list[tuple[str, str, str]]:
    """(usage, kind, expression) per row; kind is face, unknown (hard to tell) or nf (no face)."""
    plan = []
    for s, (usage, share) in enumerate(SPLITS):
        count = rows - len(plan) if s == len(SPLITS) - 1 else int(round(rows * share))
        items = [("face", c) for c in FER_CLASSES] + [("nf", "neutral"), ("unknown", "neutral")]
        while len(items) < count:
            u = rng.random()
            if u < 0.02:
                items.append(("nf", "neutral"))
            elif u < 0.06:
                items.append(("unknown", FER_CLASSES[int(rng.integers(8))]))
            elif u < 0.86:
                items.append(("face", MAIN[int(rng.integers(4))]))
            else:
                items.append(("face", FER_CLASSES[int(rng.integers(8))]))
        plan += [(usage, *items[int(i)]) for i in rng.permutation(len(items))]
    return plan


def _image(rng: np.random.Generator, kind: str, shown: str) -> np.ndarray:
    """A 48x48 grey crop: a face showing `shown`, a degraded face, or a faceless background."""
    if kind == "nf":
        return cv2.cvtColor(background(rng, SIZE, SIZE), cv2.COLOR_RGB2GRAY)
    face = build_face(random_identity(rng, int(rng.integers(2))), int(rng.integers(44, 60)))
    strength = rng.uniform(0.6, 1.0) if kind == "face" else rng.uniform(0.0, 0.4)
    image = render_expression(face, shown, strength, 0.0)
    x1, y1, x2, y2 = face.box
    grow, dx, dy = rng.uniform(1.0, 1.2), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    w, h = (x2 - x1) * grow, (y2 - y1) * grow
    cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
    grey = crop_grey(image, np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), SIZE).astype(np.float32)
    if kind == "unknown":  # blurred out of recognition
        grey = cv2.GaussianBlur(grey, (0, 0), rng.uniform(2.5, 4.0))
    grey = grey * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


def _votes(rng: np.random.Generator, kind: str, shown: str) -> list[int]:
    """Ten taggers' votes over the FER+ columns (they always sum to 10)."""
    counts = dict.fromkeys(COLUMNS, 0)
    if kind == "nf":
        counts["NF"] = 10
        return list(counts.values())
    top_key = "unknown" if kind == "unknown" else shown
    counts[top_key] = int(rng.integers(5, 8)) if kind == "unknown" else int(rng.choice(
        [10, 9, 8, 7, 6, 5, 4], p=[0.1, 0.15, 0.2, 0.2, 0.15, 0.12, 0.08]))
    for _ in range(10 - counts[top_key]):
        u = rng.random()
        if u < 0.6 and kind == "face":
            other = CONFUSABLE[shown][int(rng.integers(2))]
        elif u < 0.9:
            other = FER_CLASSES[int(rng.integers(8))]
        else:
            other = "unknown"
        if other == top_key or counts[other] + 1 >= counts[top_key]:
            other = top_key  # keep the intended class (or unknown) strictly on top
        counts[other] += 1
    return list(counts.values())
