"""Blind human ratings of a study's eval images: the image list, ``ratings.csv``, and ``human/*`` per trial.

Every trial's and the baseline's saved eval samples are rated by people, one image at a time and without
trial labels (``sdsweep.evaluation.rate`` serves the page). A rating is (rater, image, trial, answer, quality, time);
one rater's later rating of the same image replaces the earlier one, so going back and changing an answer
never counts twice. The file is rewritten atomically on every rating: a killed server loses nothing.
"""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sdsweep import io

RATINGS_CSV = "ratings.csv"
COLUMNS = ["rater", "image", "trial", "answer", "quality", "time"]
BASELINE = "baseline"  # the trial column's value for the untuned model
APPROPRIATE, INAPPROPRIATE = "yes", "no"
_WRITE_LOCK = threading.Lock()  # the rating server is threaded; one read-modify-write at a time


@dataclass(frozen=True)
class RatableImage:
    image: str  # path relative to the study folder: the stable id in ratings.csv
    trial: str  # trial number as text, or "baseline"


@dataclass(frozen=True)
class Rating:
    rater: str
    image: str
    answer: str  # yes | no
    quality: int | None = None  # optional 1-5


def ratable_images(study_dir: str | Path) -> list[RatableImage]:
    """The baseline's and every trial's saved eval samples, in a fixed (unshuffled) order."""
    paths = io.StudyPaths(Path(study_dir))
    folders = [(BASELINE, paths.baseline)] + [(str(int(d.name)), d) for d in paths.trial_dirs()]
    images = []
    for trial, folder in folders:
        for sample in sorted((folder / io.TRIAL_SAMPLES).glob("*.png")):
            images.append(RatableImage(str(sample.relative_to(paths.root)), trial))
    return images


def rater_order(images: list[RatableImage], rater: str) -> list[RatableImage]:
    """A shuffle seeded by the rater's name: stable across reloads, different between raters."""
    seed = int.from_bytes(hashlib.sha256(rater.encode()).digest()[:8], "big")
    shuffled = list(images)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def read_ratings(study_dir: str | Path) -> pd.DataFrame:
    path = Path(study_dir) / RATINGS_CSV
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path, dtype={"rater": str, "image": str, "trial": str, "answer": str})
    return frame[COLUMNS]


def save_rating(study_dir: str | Path, rating: Rating, images: dict[str, RatableImage]) -> pd.DataFrame:
    """Validate, then replace this rater's earlier rating of the image (if any) and rewrite atomically."""
    if not rating.rater.strip():
        raise ValueError("a rating needs a rater name")
    if rating.image not in images:
        raise ValueError(f"unknown image {rating.image!r}")
    if rating.answer not in (APPROPRIATE, INAPPROPRIATE):
        raise ValueError(f"answer must be {APPROPRIATE!r} or {INAPPROPRIATE!r}, got {rating.answer!r}")
    if rating.quality is not None and rating.quality not in range(1, 6):
        raise ValueError(f"quality must be 1-5 or empty, got {rating.quality!r}")
    row = {
        "rater": rating.rater,
        "image": rating.image,
        "trial": images[rating.image].trial,
        "answer": rating.answer,
        "quality": rating.quality,
        "time": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
    }
    with _WRITE_LOCK:
        frame = read_ratings(study_dir)
        keep = ~((frame["rater"] == rating.rater) & (frame["image"] == rating.image))
        frame = (
            pd.concat([frame[keep], pd.DataFrame([row])], ignore_index=True)
            if keep.any()
            else pd.DataFrame([row])
        )
        io.atomic_write_dataframe(Path(study_dir) / RATINGS_CSV, frame[COLUMNS])
    return frame


def _automatic_ok(study_dir: Path, image: str) -> bool:
    """The automatic per-image check that sits under eval/appropriate_rate (degeneracy; no safety checker)."""
    from sdsweep.data.images import open_rgb
    from sdsweep.evaluation.metrics import degenerate_reason, pil_to_float

    return degenerate_reason(pil_to_float(open_rgb(study_dir / image))) is None


def human_metrics(study_dir: str | Path) -> pd.DataFrame:
    """One row per rated trial: human/appropriate_rate, human/quality, their counts, and agreement.

    ``human/auto_agreement`` is the share of rated images where the person and the automatic degeneracy
    check (eval/appropriate_rate's per-image test, without the optional safety checker) agree.
    """
    study_dir = Path(study_dir)
    ratings = read_ratings(study_dir)
    if ratings.empty:
        return pd.DataFrame(columns=["trial"])
    ratings = ratings.assign(
        ok=ratings["answer"] == APPROPRIATE,
        quality=pd.to_numeric(ratings["quality"], errors="coerce"),
    )
    auto = {
        image: _automatic_ok(study_dir, image)
        for image in ratings["image"].unique()
        if (study_dir / image).exists()
    }
    ratings["agrees"] = [
        auto[i] == ok if i in auto else np.nan for i, ok in zip(ratings["image"], ratings["ok"])
    ]
    rows = []
    for trial, group in ratings.groupby("trial", sort=False):
        rows.append(
            {
                "trial": -1 if trial == BASELINE else int(trial),
                "human/appropriate_rate": float(group["ok"].mean()),
                "human/appropriate_n": int(len(group)),
                "human/quality": float(group["quality"].mean()) if group["quality"].notna().any() else np.nan,
                "human/quality_n": int(group["quality"].notna().sum()),
                "human/raters": int(group["rater"].nunique()),
                "human/auto_agreement": float(pd.to_numeric(group["agrees"]).mean()),
            }
        )
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)


def merge_human_columns(frame: pd.DataFrame, study_dir: str | Path) -> pd.DataFrame:
    """``frame`` with the human/* columns joined on ``trial`` (unchanged when nobody has rated yet)."""
    human = human_metrics(study_dir)
    if human.empty or frame.empty or "trial" not in frame.columns:
        return frame
    merged = frame.drop(columns=[c for c in human.columns if c != "trial" and c in frame.columns])
    return merged.merge(human, on="trial", how="left")


def agreement_across_trials(results: pd.DataFrame) -> float | None:
    """Pearson correlation of human/appropriate_rate with eval/appropriate_rate over trials with both."""
    needed = {"human/appropriate_rate", "eval/appropriate_rate"}
    if not needed <= set(results.columns):
        return None
    both = results[list(needed)].apply(pd.to_numeric, errors="coerce").dropna()
    if len(both) < 3 or both.std().min() == 0:
        return None
    return float(both["human/appropriate_rate"].corr(both["eval/appropriate_rate"]))
