"""The statistics of every stage: classification metrics, the one bootstrap, intervals over
seeds and paired differences; pure functions on arrays.

AUROC is threshold-free; balanced accuracy, sensitivity and specificity need a threshold, which is
chosen on the validation split (Youden's J) and then applied unchanged to the test split, so the
test set never tunes anything.

Every confidence interval from resampling comes from :func:`bootstrap_replicates` (rows drawn with
replacement, replicate after replicate, from ``np.random.default_rng(seed)``) and
:func:`percentile_interval`: :func:`bootstrap` (any statistic, e.g. a Fréchet distance),
:func:`bootstrap_ci` (classification metrics at a threshold), :func:`paired_auroc_deltas` and
:func:`combine_seed_deltas` (two classifiers on the same test images, then over seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and scores {p.shape} differ in length")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"binary labels 0/1 expected, got {sorted(set(np.unique(y)))}")
    return y, p


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y, p = _check(y, p)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1."""
    from sklearn.metrics import roc_curve

    y, p = _check(y, p)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    i = int(np.argmax(tpr - fpr))
    return float(min(thr[i], 1.0))


def sensitivity(y: np.ndarray, pred: np.ndarray) -> float:
    pos = y == 1
    return float((pred[pos] == 1).mean()) if pos.any() else float("nan")


def specificity(y: np.ndarray, pred: np.ndarray) -> float:
    neg = y == 0
    return float((pred[neg] == 0).mean()) if neg.any() else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    y, p = _check(y, p)
    pred = (p >= threshold).astype(int)
    se, sp = sensitivity(y, pred), specificity(y, pred)
    return {
        "auroc": auroc(y, p),
        "balanced_accuracy": 0.5 * (se + sp),
        "sensitivity": se,
        "specificity": sp,
    }


def _aurocs(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of ``[B, n]`` labels and scores (Mann-Whitney with average ranks for ties,
    equal to sklearn's ``roc_auc_score``); NaN for a row holding one class only."""
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=1)
    n1 = y.sum(1).astype(float)
    n0 = y.shape[1] - n1
    u = (ranks * y).sum(1) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def bootstrap_replicates(
    stat: Callable[..., Any],
    *arrays,
    n_boot: int,
    seed: int | np.random.Generator = 0,
    batched: bool = False,
) -> np.ndarray:
    """``stat`` on ``n_boot`` bootstrap resamples of ``arrays``: the one resampling of every
    interval here. Each array's rows are drawn with replacement, independently of the other arrays
    (two-sample statistics resample both sets; stack paired columns into one array to keep them
    together), as successive ``rng.integers(0, len(a), len(a))``, replicate after replicate, array
    after array. ``seed``: an int, or the generator to draw from (a statistic may draw from it too).

    ``batched``: one array, all replicates at once: ``stat`` gets ``[n_boot, n, ...]`` resampled
    rows (the very rows of the one-by-one draws) and returns ``[n_boot]`` or ``[n_boot, k]`` values.
    """
    rng = np.random.default_rng(seed)
    if batched:
        (a,) = arrays
        return np.asarray(stat(a[rng.integers(0, len(a), (n_boot, len(a)))]))
    vals = []
    for _ in range(n_boot):
        res = [a[rng.integers(0, len(a), len(a))] for a in arrays]
        vals.append(float(stat(*res)))
    return np.asarray(vals, dtype=float)


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The ``alpha/2`` and ``1 - alpha/2`` quantiles of bootstrap replicates, the non-finite ones
    (a resample a statistic is undefined on) left out; NaN when none is finite."""
    v = np.asarray(replicates, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap(
    stat: Callable[..., float],
    *arrays,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    bias_correct: bool = False,
) -> tuple[float, float, float]:
    """Point estimate and percentile interval of ``stat(*arrays)`` (resampling:
    :func:`bootstrap_replicates`).

    ``bias_correct`` shifts the interval by the bootstrap bias (mean of the replicates minus the
    point estimate): resampling with replacement duplicates samples, which shrinks a set's spread
    and inflates distribution distances such as FD, so their raw percentile interval can miss
    the estimate altogether."""
    point = float(stat(*arrays))
    v = bootstrap_replicates(stat, *arrays, n_boot=n_boot, seed=seed)
    v = v[np.isfinite(v)]
    lo, hi = percentile_interval(v, alpha)
    if bias_correct and v.size:
        bias = float(v.mean()) - point
        lo, hi = lo - bias, hi - bias
    return point, lo, hi


def mean_with_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and bootstrap interval of per-sample values (e.g. 0/1 indicators)."""
    return bootstrap(lambda v: float(np.mean(v)), np.asarray(values, dtype=float), n_boot=n_boot, seed=seed)


def _threshold_metrics(yp: np.ndarray, threshold: float) -> np.ndarray:
    """``[B, 4]``: AUROC, balanced accuracy, sensitivity, specificity of each row of ``[B, n, 2]``
    (label, score) resamples, NaN where a row holds one class only."""
    yb, pb = yp[..., 0].astype(int), yp[..., 1]
    pred = pb >= threshold
    pos, neg = yb == 1, yb == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        se = (pred & pos).sum(1) / np.where(pos.any(1), pos.sum(1), np.nan)
        sp = (~pred & neg).sum(1) / np.where(neg.any(1), neg.sum(1), np.nan)
    return np.stack([_aurocs(yb, pb), 0.5 * (se + sp), se, sp], axis=1)


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Point estimates plus percentile-bootstrap ``_lo``/``_hi`` bounds (resampling test cases).
    All replicates at once (one rank per row): the same resamples and values as one
    ``binary_metrics`` call per replicate, ~50x faster at 1,000 replicates."""
    y, p = _check(y, p)
    point = binary_metrics(y, p, threshold)
    samples = bootstrap_replicates(
        lambda yp: _threshold_metrics(yp, threshold),
        np.stack([y, p], 1),
        n_boot=n_boot,
        seed=seed,
        batched=True,
    )
    out = dict(point)
    for j, k in enumerate(("auroc", "balanced_accuracy", "sensitivity", "specificity")):
        out[f"{k}_lo"], out[f"{k}_hi"] = percentile_interval(samples[:, j], alpha)
    out["n"] = float(len(y))
    return out


def mean_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and a t-interval over independent repeats (seeds); NaN bounds for fewer than 2."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half


def clipped_mean_ci(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> tuple[float, float, float]:
    """:func:`mean_ci` over seeds, its interval clipped to ``[low, high]`` (an AUROC's range)."""
    m, lo, hi = mean_ci(values)
    if np.isfinite(lo):
        lo, hi = max(lo, low), min(hi, high)
    return m, lo, hi


def paired_auroc_deltas(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, np.ndarray]:
    """AUROC(a) - AUROC(b) on the same test images, and ``n_boot`` paired bootstrap replicates of
    it (each resamples the images once and scores both classifiers on that resample): the
    difference's test-set uncertainty, with the two classifiers' errors on shared images
    cancelling as they should. Replicates whose resample holds one class only are dropped."""
    y, p_a = _check(y, p_a)
    _, p_b = _check(y, p_b)
    delta = auroc(y, p_a) - auroc(y, p_b)

    def deltas(rows: np.ndarray) -> np.ndarray:
        yb = rows[..., 0].astype(int)
        return _aurocs(yb, rows[..., 1]) - _aurocs(yb, rows[..., 2])  # NaN: one class only

    reps = bootstrap_replicates(deltas, np.stack([y, p_a, p_b], 1), n_boot=n_boot, seed=seed, batched=True)
    return delta, reps[np.isfinite(reps)]


def combine_seed_deltas(
    deltas: list[float], replicates: list[np.ndarray], n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The mean over seeds of per-seed paired deltas (``deltas[k]``, with ``replicates[k]`` from
    :func:`paired_auroc_deltas`), with a 95 % interval from a two-level bootstrap: draw the seeds
    with replacement (training randomness), then one of each drawn seed's paired test-set
    replicates (test-set noise), and average."""
    reps = [np.asarray(r, dtype=float) for r in replicates]
    if not reps or any(len(r) == 0 for r in reps) or len(reps) != len(deltas):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)

    def mean_of_draws(ks: np.ndarray) -> float:  # one test-set replicate of each drawn seed
        return float(np.mean([reps[k][rng.integers(0, len(reps[k]))] for k in ks]))

    draws = bootstrap_replicates(mean_of_draws, np.arange(len(reps)), n_boot=n_boot, seed=rng)
    lo, hi = percentile_interval(draws)
    return float(np.mean(deltas)), lo, hi
