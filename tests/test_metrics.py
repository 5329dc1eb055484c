from __future__ import annotations

import numpy as np
import pytest

from pipeline.infra import metrics as M
from pipeline.infra.metrics import auroc, binary_metrics, bootstrap_ci, mean_ci, youden_threshold


def test_perfect_and_inverted_scores():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    m = binary_metrics(y, np.array([0.1, 0.6, 0.8, 0.4]), 0.5)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5 and m["balanced_accuracy"] == 0.5


def test_youden_threshold_separates_separable_scores():
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.linspace(0.0, 0.4, 50), np.linspace(0.6, 1.0, 50)])
    t = youden_threshold(y, p)
    assert 0.4 < t <= 0.6
    assert binary_metrics(y, p, t)["balanced_accuracy"] == 1.0


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)

    def draw(n):
        y = rng.integers(0, 2, n)
        return y, y * 0.8 + rng.normal(0, 0.5, n)

    small = bootstrap_ci(*draw(60), 0.4, n_boot=300)
    large = bootstrap_ci(*draw(2000), 0.4, n_boot=300)
    for r in (small, large):
        assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"]
    assert (large["auroc_hi"] - large["auroc_lo"]) < (small["auroc_hi"] - small["auroc_lo"])


def test_mean_ci():
    m, lo, hi = mean_ci(np.array([1.0, 2.0, 3.0]))
    assert m == 2.0 and lo < 2.0 < hi
    assert np.isnan(mean_ci(np.array([1.0]))[1])


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="binary labels"):
        auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="differ in length"):
        auroc(np.array([0, 1]), np.array([0.1]))


def test_paired_deltas_cancel_shared_errors_and_find_a_real_difference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = rng.normal(size=400)
    weak = y + 1.5 * noise
    strong = y + 0.5 * noise  # the same images' errors, smaller
    d0, r0 = M.paired_auroc_deltas(y, weak, weak.copy(), n_boot=200)
    # one classifier against itself: no difference in any resample
    assert d0 == 0 and np.all(r0 == 0)
    d, r = M.paired_auroc_deltas(y, strong, weak, n_boot=200)
    assert d > 0 and np.percentile(r, 2.5) > 0
    m, lo, hi = M.combine_seed_deltas([d, d / 2], [r, r / 2], n_boot=500)
    assert m == (d + d / 2) / 2 and 0 < lo <= m <= hi
    # a seed without replicates gives no interval rather than a narrower one
    assert np.isnan(M.combine_seed_deltas([d], [np.array([])])[0])


def test_vectorised_bootstrap_equals_one_binary_metrics_call_per_replicate():
    # the bootstrap scores all replicates at once (one rank per row); it must give what the
    # per-replicate loop gave: the same resamples, the same values, ties included
    import numpy as np

    from pipeline.infra import metrics as M

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p = np.round(rng.random(120), 1)  # many ties
    fast = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=7)
    r = np.random.default_rng(7)
    samples = {k: [] for k in ("auroc", "balanced_accuracy", "sensitivity", "specificity")}
    for _ in range(200):
        i = r.integers(0, 120, 120)
        for k, v in M.binary_metrics(y[i], p[i], 0.5).items():
            samples[k].append(v)
    for k, vals in samples.items():
        a = np.asarray(vals, float)
        a = a[np.isfinite(a)]
        lo, hi = np.quantile(a, [0.025, 0.975])
        assert abs(fast[f"{k}_lo"] - lo) < 1e-12 and abs(fast[f"{k}_hi"] - hi) < 1e-12, k
    q = np.round(rng.random(120), 1)
    _, reps = M.paired_auroc_deltas(y, p, q, n_boot=50, seed=1)
    r = np.random.default_rng(1)
    ref = []
    for _ in range(50):
        i = r.integers(0, 120, 120)
        if y[i].min() != y[i].max():
            ref.append(M.auroc(y[i], p[i]) - M.auroc(y[i], q[i]))
    assert np.allclose(reps, ref, atol=1e-12)
