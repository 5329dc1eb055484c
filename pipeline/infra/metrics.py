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


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Point estimates plus percentile-bootstrap ``_lo``/``_hi`` bounds (resampling test cases)."""
    y, p = _check(y, p)
    point = binary_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    n = len(y)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = binary_metrics(y[idx], p[idx], threshold)
        for k, v in m.items():
            samples[k].append(v)
    out = dict(point)
    for k, vals in samples.items():
        arr = np.asarray(vals, dtype=float)
        arr = arr[np.isfinite(arr)]
        lo, hi = np.quantile(arr, [alpha / 2, 1 - alpha / 2]) if arr.size else (np.nan, np.nan)
        out[f"{k}_lo"], out[f"{k}_hi"] = float(lo), float(hi)
    out["n"] = float(n)
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
