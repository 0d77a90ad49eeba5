"""CMMD (Jayasumana et al., CVPR 2024): the maximum mean discrepancy between two sets of CLIP image embeddings.

MMD with a Gaussian RBF kernel, sigma = 10, on unit-length CLIP embeddings, scaled by 1000. Unlike FID it
assumes no normal distribution and its estimator is unbiased, so it is usable at the few dozen images a
sweep can afford. We use the unbiased estimator (the U-statistic: a set's kernel mean leaves out each
image's similarity with itself). The authors' reference code keeps those diagonal terms, which adds about
``1000 * (1 - mean kernel) / n`` per set: at 8 images that bias is as large as the differences we look for.

One value for the whole image set, so its interval is a bootstrap over the generated images (the
reference set stays fixed): resample the images with replacement (within each prompt), recompute the
statistic from the precomputed kernel matrices, and take the percentile interval. Pairs of the same
original image are left out of the resampled within-set mean, so a duplicate never counts as a perfect
match with itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sdsweep.uncertainty import Interval

SIGMA = 10.0
SCALE = 1000.0
RESAMPLES = 200


def _unit(features) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def rbf_kernel(a: np.ndarray, b: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """exp(-|a_i - b_j|^2 / (2 sigma^2)) for every pair of rows."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * sigma**2))


def _offdiagonal_mean(kernel: np.ndarray) -> float:
    n = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))


def _check(reference: np.ndarray, generated: np.ndarray) -> None:
    if len(reference) < 2 or len(generated) < 2:
        from sdsweep.evaluation.metrics import MetricUnavailable

        raise MetricUnavailable(
            f"CMMD needs at least 2 images per set (got {len(reference)} reference, {len(generated)} "
            "generated); set eval.reference_dir or data.num_heldout >= 2."
        )


def cmmd(reference, generated, normalize: bool = True) -> float:
    """1000 x unbiased MMD^2 (RBF, sigma 10) between the rows of two feature matrices."""
    x = _unit(reference) if normalize else np.asarray(reference, dtype=np.float64)
    y = _unit(generated) if normalize else np.asarray(generated, dtype=np.float64)
    _check(x, y)
    k_xx = _offdiagonal_mean(rbf_kernel(x, x))
    k_yy = _offdiagonal_mean(rbf_kernel(y, y))
    k_xy = float(rbf_kernel(x, y).mean())
    return SCALE * (k_xx + k_yy - 2.0 * k_xy)


def cmmd_interval(
    reference,
    generated,
    strata: Sequence | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """CMMD with a percentile bootstrap interval over the generated images (stratified by ``strata``)."""
    x, y = _unit(reference), _unit(generated)
    _check(x, y)
    k_yy, k_xy = rbf_kernel(y, y), rbf_kernel(x, y)
    k_xx = _offdiagonal_mean(rbf_kernel(x, x))
    value = SCALE * (k_xx + _offdiagonal_mean(k_yy) - 2.0 * float(k_xy.mean()))
    labels = np.asarray(strata) if strata is not None else np.zeros(len(y), dtype=int)
    groups = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        distinct = index[:, None] != index[None, :]
        if not distinct.any():
            continue
        within = float(k_yy[np.ix_(index, index)][distinct].mean())
        draws.append(SCALE * (k_xx + within - 2.0 * float(k_xy[:, index].mean())))
    if len(draws) < 2:
        return Interval(value, None, None, None, len(y), "none", "too few distinct images to resample")
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(draws, [tail, 100.0 - tail])
    return Interval(value, float(lo), float(hi), float(np.std(draws, ddof=1)), len(y), "bootstrap")
