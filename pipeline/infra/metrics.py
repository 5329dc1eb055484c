"""Classification metrics with bootstrap confidence intervals: pure functions on arrays.

AUROC is threshold-free; balanced accuracy, sensitivity and specificity need a threshold, which is
chosen on the validation split (Youden's J) and then applied unchanged to the test split, so the
test set never tunes anything.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _resamples(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``n_boot`` bootstrap index rows, drawn as ``n_boot`` successive ``rng.integers(0, n, n)``."""
    return rng.integers(0, n, (n_boot, n))


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Point estimates plus percentile-bootstrap ``_lo``/``_hi`` bounds (resampling test cases).
    All replicates at once (one rank per row): the same resamples and values as one
    ``binary_metrics`` call per replicate, ~50x faster at 1,000 replicates."""
    y, p = _check(y, p)
    point = binary_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    idx = _resamples(rng, len(y), n_boot)
    yb, pb = y[idx], p[idx]
    pred = pb >= threshold
    pos, neg = yb == 1, yb == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        se = (pred & pos).sum(1) / np.where(pos.any(1), pos.sum(1), np.nan)
        sp = (~pred & neg).sum(1) / np.where(neg.any(1), neg.sum(1), np.nan)
    samples = {
        "auroc": _aurocs(yb, pb),
        "balanced_accuracy": 0.5 * (se + sp),
        "sensitivity": se,
        "specificity": sp,
    }
    out = dict(point)
    for k, arr in samples.items():
        arr = arr[np.isfinite(arr)]
        lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if arr.size else (np.nan, np.nan)
        out[f"{k}_lo"], out[f"{k}_hi"] = float(lo), float(hi)
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
    idx = _resamples(np.random.default_rng(seed), len(y), n_boot)
    yb = y[idx]
    keep = yb.min(1) != yb.max(1)
    yb, idx = yb[keep], idx[keep]
    return delta, _aurocs(yb, p_a[idx]) - _aurocs(yb, p_b[idx])


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
    draws = np.empty(n_boot)
    for b in range(n_boot):
        ks = rng.integers(0, len(reps), len(reps))
        draws[b] = np.mean([reps[k][rng.integers(0, len(reps[k]))] for k in ks])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(np.mean(deltas)), float(lo), float(hi)
