"""How sure a number is: intervals for means and rates, paired differences between trials, and the
power of a study to tell trials apart.

Every trial is evaluated on the same units (one generated image per prompt × seed, or one held-out
caption), so the noise of one evaluation is large but *shared*: two trials compared unit by unit
(paired) are told apart with far fewer units than their separate intervals suggest. Hence:

- means get a bootstrap over units, stratified by prompt: a prompt's images are resampled among
  themselves, so the interval does not count the spread between prompts (which every trial shares)
  as noise;
- rates get a Wilson score interval (exact enough at small n, never outside [0, 1]);
- differences between two trials are bootstrapped on the per-unit differences, with a Wilcoxon
  signed-rank p-value; ``significantly_worse`` is the one-sided test a paired pruner asks;
- results across training seeds (2-5 values) get a t interval: too few values for a bootstrap.

The statistics are scipy.stats'; this module only chooses them and handles the degenerate cases
(no units, one unit, all values equal) with a stated reason instead of a NaN or an exception.
It is a leaf: numpy, scipy and the standard library only.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import stats

OPS = (">=", ">", "<=", "<")
DIRECTIONS = ("maximize", "minimize")
# Familywise error of a separation claim ("the best is separated from every other trial"): see Difference.separates.
SEPARATION_ALPHA = 0.05


def _json_float(x: float) -> float | None:
    """NaN is not JSON: it travels as None (and comes back as NaN where a number is required)."""
    return None if math.isnan(x) else x


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% (or ``confidence``) interval, or the reason it has none."""

    value: float  # the point estimate (the plain mean / rate / statistic)
    lo: float | None  # lower end of the interval; None = no interval
    hi: float | None
    se: float | None  # standard error (bootstrap sd of the statistic, or analytic)
    n: int  # number of units it is computed from
    method: str  # "bootstrap" | "wilson" | "t" | "none"
    reason: str | None = None  # why there is no interval (method "none")

    def contains(self, x: float) -> bool:
        """lo <= x <= hi; False when there is no interval (nothing is known to be inside)."""
        return self.lo is not None and self.hi is not None and self.lo <= x <= self.hi

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Interval:
        return _from_json(cls, d, "value")


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) between two trials, with its interval and a rank-test p-value."""

    mean: float
    lo: float | None
    hi: float | None
    se: float | None
    n: int  # paired: number of shared units; unpaired: len(a) + len(b)
    p_value: float | None  # paired: two-sided Wilcoxon signed-rank; unpaired: Mann-Whitney U
    paired: bool
    reason: str | None = None  # why there is no interval or no p-value

    def excludes_zero(self) -> bool:
        """The interval lies entirely above or below 0: the two trials are separated."""
        if self.lo is None or self.hi is None:
            return False
        return self.lo > 0 or self.hi < 0

    def separates(self, family: int = 1, alpha: float = SEPARATION_ALPHA) -> bool:
        """The two trials are told apart, as one of ``family`` comparisons made at once: the shown interval
        excludes 0 *and* the rank test, Bonferroni-corrected (p x family), rejects at ``alpha``.

        Why both: on 16 heavy-tailed CLIP units the bootstrap interval alone undercovers (a demo trial had
        [-39.8, -2.6] and signed-rank p 0.33), and "separated from every other trial" is one claim about all
        of them, made after picking the best on the same units (Hsu's comparisons with the best, Bonferroni).
        """
        if not self.excludes_zero() or self.p_value is None:
            return False
        return min(1.0, self.p_value * max(1, family)) < alpha

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Difference:
        return _from_json(cls, d, "mean")


def _to_json(record: Interval | Difference) -> dict[str, Any]:
    return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(record).items()}


def _from_json(cls: Any, d: Mapping[str, Any], point: str) -> Any:
    """Inverse of ``_to_json``: a null point estimate is NaN again; other nulls stay None."""
    kwargs = {f.name: d.get(f.name) for f in fields(cls)}
    for name, value in kwargs.items():
        if name in ("n",):
            kwargs[name] = int(value)
        elif name == point:
            kwargs[name] = math.nan if value is None else float(value)
        elif name in ("lo", "hi", "se", "p_value") and value is not None:
            kwargs[name] = float(value)
    return cls(**kwargs)


# --- input checking ---------------------------------------------------------------------------------


def _as_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers (one per unit), got shape {arr.shape}.")
    return arr


def _units(values: Any, strata: Any, name: str) -> tuple[np.ndarray, list[Hashable]]:
    """The non-NaN values (a unit that could not be scored is left out) with their stratum labels."""
    arr = _as_1d(values, name)
    labels = [0] * len(arr) if strata is None else list(np.asarray(strata).tolist())
    if len(labels) != len(arr):
        raise ValueError(
            f"strata for {name} has {len(labels)} labels for {len(arr)} values: give one label per value."
        )
    keep = (~np.isnan(arr)).tolist()
    return arr[keep], [label for label, k in zip(labels, keep) if k]


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie strictly between 0 and 1 (e.g. 0.95).")


def _groups(values: np.ndarray, labels: list[Hashable]) -> list[np.ndarray]:
    """Values split by stratum (order of first appearance, so results do not depend on label types).

    Strata with a single value are pooled into one group: a lone value cannot be resampled, and fixing
    it would make one-image-per-prompt evaluations look noiseless. Pooling the lone values treats them as
    one stratum, which is as honest as the data allow.
    """
    by_label: dict[Hashable, list[float]] = {}
    for v, label in zip(values.tolist(), labels):
        by_label.setdefault(label, []).append(v)
    groups = [np.asarray(g) for g in by_label.values() if len(g) > 1]
    singles = [g[0] for g in by_label.values() if len(g) == 1]
    if singles:
        groups.append(np.asarray(singles))
    return groups


# --- the bootstrap ----------------------------------------------------------------------------------


def _linear_bootstrap(
    groups: list[np.ndarray], weights: list[float], confidence: float, n_resamples: int, seed: int
) -> tuple[float, float, float, float]:
    """Bootstrap of ``sum_i weights[i] * mean(groups[i])``, each group resampled on its own.

    That statistic is the stratified mean (weights = stratum size / total) and, with negative weights on
    a second set of groups, the unpaired difference of two stratified means. Returns (value, lo, hi, se).
    BCa first (corrects bias and skew); percentile where BCa cannot be computed (NaN ends).
    """
    value = float(sum(w * g.mean() for w, g in zip(weights, groups)))
    if all(len(g) < 2 or np.ptp(g) == 0 for g in groups):
        return value, value, value, 0.0  # nothing varies under resampling
    # A group of one value (at most the pooled lone strata) is a constant under resampling.
    constant = sum(w * g.mean() for w, g in zip(weights, groups) if len(g) < 2)
    w = [wi for wi, g in zip(weights, groups) if len(g) >= 2]
    # Rescaled within each group (Rao & Wu): resampling n values reproduces their spread with divisor n,
    # not n - 1, so a group of 2 would look half as noisy as it is. Widening each group about its mean by
    # sqrt(n / (n - 1)) makes the bootstrap variance the unbiased one and leaves the statistic unchanged.
    # The price: with groups of 2-3 the interval can reach a little past the observed range.
    data = [g.mean() + (g - g.mean()) * math.sqrt(len(g) / (len(g) - 1)) for g in groups if len(g) >= 2]

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return constant + sum(wi * np.mean(s, axis=axis) for wi, s in zip(w, samples))

    common = dict(vectorized=True, paired=False, confidence_level=confidence, rng=np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # BCa's "degenerate distribution" note
        res = stats.bootstrap(data, statistic, n_resamples=n_resamples, method="BCa", **common)
        lo, hi = res.confidence_interval
        if not (np.isfinite(lo) and np.isfinite(hi)):
            res = stats.bootstrap(
                data, statistic, n_resamples=0, method="percentile", bootstrap_result=res, **common
            )
            lo, hi = res.confidence_interval
    return value, float(lo), float(hi), float(res.standard_error)


def mean_interval(
    values: Sequence[float],
    strata: Sequence[Hashable] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a bootstrap interval, resampled within each stratum (e.g. prompt index).

    The statistic is the overall mean, each stratum weighted by its size. NaN values (a unit that could not
    be scored) are dropped, and ``n`` counts the rest. Deterministic given ``seed``.
    """
    _check_confidence(confidence)
    arr, labels = _units(values, strata, "values")
    n = len(arr)
    if n == 0:
        return Interval(math.nan, None, None, None, 0, "none", "no finite values")
    if not np.isfinite(arr).all():
        return Interval(float(arr.mean()), None, None, None, n, "none", "infinite values")
    groups = _groups(arr, labels)
    value, lo, hi, se = _linear_bootstrap(groups, [len(g) / n for g in groups], confidence, n_resamples, seed)
    return Interval(value, lo, hi, se, n, "bootstrap")


def rate_interval(successes: Sequence[float | bool], confidence: float = 0.95) -> Interval:
    """Share of True/1 among the finite entries, with a Wilson score interval (stays inside [0, 1] and
    keeps its coverage at 0/n and n/n, where the normal approximation collapses to a point)."""
    _check_confidence(confidence)
    arr = _as_1d(successes, "successes")
    arr = arr[np.isfinite(arr)]
    if not np.isin(arr, (0.0, 1.0)).all():
        bad = arr[~np.isin(arr, (0.0, 1.0))][:3].tolist()
        raise ValueError(f"successes must be True/False or 1/0 (NaN = not scored), got {bad}.")
    n = len(arr)
    if n == 0:
        return Interval(math.nan, None, None, None, 0, "none", "no scored units")
    k = int(arr.sum())
    p = k / n
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(p, float(ci.low), float(ci.high), math.sqrt(p * (1 - p) / n), n, "wilson")


def _differences(a: Any, b: Any) -> np.ndarray:
    """a - b unit by unit (NaN where either is missing). Mappings (unit -> value) are matched on their
    shared units, sequences by position."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [k for k in a if k in b]
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    x, y = _as_1d(a, "a"), _as_1d(b, "b")
    if len(x) != len(y):
        raise ValueError(
            f"a has {len(x)} units and b has {len(y)}: a paired comparison needs the same units in the same "
            "order (or, for significantly_worse, two mappings unit -> value, matched on their shared units)."
        )
    with np.errstate(invalid="ignore"):
        return x - y


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    strata: Sequence[Hashable] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Difference:
    """mean(a - b) where a[i], b[i] are the same unit (same prompt and seed) on two models.

    The per-unit noise that both models share (a hard prompt, an unlucky seed) cancels in a - b, so this
    interval is much narrower than the one from comparing two separate means. Units missing in either
    (NaN) are dropped. p_value: two-sided Wilcoxon signed-rank on a - b (None when n < 2 or all 0).
    """
    d = _differences(a, b)
    iv = mean_interval(d, strata, confidence, n_resamples, seed)
    p_value, reason = _signed_rank(d[~np.isnan(d)], "two-sided")
    return Difference(iv.value, iv.lo, iv.hi, iv.se, iv.n, p_value, True, iv.reason or reason)


def _signed_rank(d: np.ndarray, alternative: str) -> tuple[float | None, str | None]:
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return None, "fewer than 2 paired units"
    if not np.any(d != 0):
        return None, "all paired differences are 0"
    return float(stats.wilcoxon(d, alternative=alternative).pvalue), None


def unpaired_difference(
    a: Sequence[float],
    b: Sequence[float],
    strata_a: Sequence[Hashable] | None = None,
    strata_b: Sequence[Hashable] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Difference:
    """mean(a) - mean(b) with a and b resampled independently (each stratified by its own labels).

    For units that are not shared, and to show what pairing buys. p_value: two-sided Mann-Whitney U.
    """
    _check_confidence(confidence)
    (x, la), (y, lb) = _units(a, strata_a, "a"), _units(b, strata_b, "b")
    n = len(x) + len(y)
    if len(x) == 0 or len(y) == 0:
        return Difference(math.nan, None, None, None, n, None, False, "no finite values on one side")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return Difference(x.mean() - y.mean(), None, None, None, n, None, False, "infinite values")
    ga, gb = _groups(x, la), _groups(y, lb)
    weights = [len(g) / len(x) for g in ga] + [-len(g) / len(y) for g in gb]
    value, lo, hi, se = _linear_bootstrap(ga + gb, weights, confidence, n_resamples, seed)
    if np.ptp(np.concatenate([x, y])) == 0:
        return Difference(value, lo, hi, se, n, None, False, "all values equal")
    p_value = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return Difference(value, lo, hi, se, n, p_value, False)


def significantly_worse(
    candidate: Sequence[float] | Mapping[Hashable, float],
    best: Sequence[float] | Mapping[Hashable, float],
    direction: str,
    alpha: float = 0.1,
) -> bool:
    """Is ``candidate`` worse than ``best`` on their shared units? One-sided paired Wilcoxon signed-rank
    ('less' when maximizing, 'greater' when minimizing) at level ``alpha``.

    False with fewer than 5 shared units (the test cannot reach small p-values there) or when every
    difference is 0: a paired pruner must not prune on no evidence.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: allowed values are {list(DIRECTIONS)}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must lie strictly between 0 and 1 (e.g. 0.1).")
    d = _differences(candidate, best)
    if np.isfinite(d).sum() < 5:
        return False
    p_value, _ = _signed_rank(d, "less" if direction == "maximize" else "greater")
    return p_value is not None and p_value < alpha


def replicate_sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1) across training seeds; None with fewer than 2 finite values."""
    arr = _as_1d(values, "values")
    arr = arr[np.isfinite(arr)]
    return float(np.std(arr, ddof=1)) if len(arr) >= 2 else None


def replicate_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean across training seeds with a t interval (df = n - 1, se = sd / sqrt(n)).

    Replicates are few (2-5), too few for a bootstrap to resample meaningfully; the t interval is wide at
    small n, which is the honest answer.
    """
    _check_confidence(confidence)
    arr = _as_1d(values, "values")
    arr = arr[np.isfinite(arr)]
    n = len(arr)
    if n == 0:
        return Interval(math.nan, None, None, None, 0, "none", "no training seed finished")
    mean = float(arr.mean())
    if n == 1:
        return Interval(mean, None, None, None, 1, "none", "one training seed")
    sd = replicate_sd(arr)
    assert sd is not None
    se = sd / math.sqrt(n)
    if se == 0:
        return Interval(mean, mean, mean, 0.0, n, "t")
    lo, hi = stats.t.interval(confidence, df=n - 1, loc=mean, scale=se)
    return Interval(mean, float(lo), float(hi), se, n, "t")


class ConstraintStatus(str, enum.Enum):
    """Where a trial stands on a constraint once its metric's uncertainty is counted."""

    MET = "met"  # the whole interval satisfies it
    UNCERTAIN = "uncertain"  # the interval straddles the threshold
    VIOLATED = "violated"  # the whole interval fails it


def _satisfies(x: float, op: str, threshold: float) -> bool:
    return {">=": x >= threshold, ">": x > threshold, "<=": x <= threshold, "<": x < threshold}[op]


def constraint_status(interval: Interval, op: str, threshold: float) -> ConstraintStatus:
    """MET / UNCERTAIN / VIOLATED for ``value op threshold``. The ops are monotone, so the two ends of the
    interval decide. Without an interval the value decides; a NaN value (not measured) is VIOLATED."""
    if op not in OPS:
        raise ValueError(f"op={op!r}: allowed values are {list(OPS)}.")
    if math.isnan(interval.value):
        return ConstraintStatus.VIOLATED
    if interval.lo is None or interval.hi is None:
        ends = [interval.value]
    else:
        ends = [interval.lo, interval.hi]
    met = [_satisfies(x, op, threshold) for x in ends]
    if all(met):
        return ConstraintStatus.MET
    return ConstraintStatus.VIOLATED if not any(met) else ConstraintStatus.UNCERTAIN


def resolvable_difference(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference between two trials that a two-sided test at ``alpha`` detects with
    probability ``power``, given one trial's standard error ``se`` of the mean and two independent trials
    (difference se = sqrt(2) * se): (z_{1-alpha/2} + z_{power}) * sqrt(2) * se, about 2.8 * sqrt(2) * se.

    This is the pessimistic figure: trials compared paired on shared units cancel the shared noise and
    resolve smaller differences, so it is the bound to state before the sweep, not a verdict.
    """
    if se < 0:
        raise ValueError(f"se={se} is a standard error and cannot be negative.")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha={alpha} and power={power} must lie strictly between 0 and 1.")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * math.sqrt(2) * se)
