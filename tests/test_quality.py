"""Synthesis-quality metrics on known cases built from the embedded phantom data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import quality as Q
from pipeline.config import ConfigError, load_config


@pytest.fixture(scope="module")
def phantoms(phantom_manifest):
    from pipeline.evaluate import load_images

    train, _ = load_images(phantom_manifest, "train", 32)
    test, _ = load_images(phantom_manifest, "test", 32)
    return train, test


def _features(x: torch.Tensor) -> torch.Tensor:
    # a fixed, deterministic embedding: 8x8 average-pooled pixels
    return torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1).double()


def test_identical_sets_give_zero_distance_and_full_precision_recall(phantoms):
    train, _ = phantoms
    f = _features(train)
    assert abs(Q.frechet_distance(f, f)) < 1e-6
    # the unbiased kernel estimators are ~0 (slightly negative) on identical sets
    shifted = _features((train + 0.6).clamp(-1, 1))
    assert abs(Q.mmd_linear(f, f)) < 0.05 * Q.mmd_linear(shifted, f)
    assert abs(Q.kid(f, f, subsets=3)) < 0.05 * Q.kid(shifted, f, subsets=3)
    m = Q.prdc(f, f, k=5)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["coverage"] == 1.0
    assert m["density"] >= 1.0


def test_a_shifted_set_has_a_clearly_larger_distance(phantoms):
    train, test = phantoms
    same = Q.frechet_distance(_features(test), _features(train))
    shifted = Q.frechet_distance(_features((test + 0.6).clamp(-1, 1)), _features(train))
    assert shifted > 5 * same and shifted > 1.0
    assert Q.kid(_features((test + 0.6).clamp(-1, 1)), _features(train), subsets=3) > Q.kid(
        _features(test), _features(train), subsets=3
    )
    p = Q.prdc(_features(train), _features((test + 0.6).clamp(-1, 1)), k=5)
    assert p["precision"] < 0.5


def test_a_copied_training_image_is_flagged_by_the_audit(phantoms):
    train, test = phantoms
    g = torch.Generator().manual_seed(0)
    fake = (test[:8] + 0.05 * torch.randn(test[:8].shape, generator=g)).clamp(-1, 1)  # new images
    fake[3] = train[5]  # ... and one exact copy of a training image
    audit = Q.memorisation_audit(fake, train, test, percentile=1.0)
    assert audit["near_copy"][3] and audit["nearest"][3] == 5 and audit["distance"][3] == 0.0
    assert audit["near_copy"].sum() == 1


def test_ms_ssim_diversity(phantoms):
    train, _ = phantoms
    same = Q.ms_ssim_pairs(train[:1].repeat(6, 1, 1, 1), n_pairs=20)
    assert np.allclose(same, 1.0, atol=1e-4)
    varied = Q.ms_ssim_pairs(train, n_pairs=50)
    assert varied.mean() < 0.99
    assert Q.ms_ssim_setup(64)[0] == 3 and len(Q.ms_ssim_setup(64)[1]) == 5
    assert Q.ms_ssim_setup(256) == (11, Q.MS_SSIM_WEIGHTS) or Q.ms_ssim_setup(256)[0] == 11
    assert len(Q.ms_ssim_setup(32)[1]) == 4 and abs(sum(Q.ms_ssim_setup(32)[1]) - 1) < 1e-9
    with pytest.raises(ValueError, match="too small"):
        Q.ms_ssim_setup(4)


def test_bootstrap_interval_brackets_the_point():
    v = np.random.default_rng(0).normal(size=200)
    m, lo, hi = Q.mean_with_ci(v)
    assert lo < m < hi


def test_evaluate_stage_end_to_end(tmp_path, phantom_manifest, phantom_generator, phantom_extractor):
    import json

    from pipeline.evaluate import EvaluateConfig, evaluate

    uri = f"sqlite:///{tmp_path / 'ev.db'}"
    res = evaluate(
        load_config(
            EvaluateConfig,
            None,
            [
                f"checkpoint={phantom_generator['checkpoint']}",
                f"extractor={phantom_extractor}",
                f"reference={phantom_manifest}",
                "bootstrap=10",
                "k=3",
                f"anomaly_checkpoint={_normal_only_model(tmp_path, phantom_manifest)}",
                f"out_dir={tmp_path / 'ev'}",
                f"tracking.uri={uri}",
            ],
        )
    )
    m = res["metrics"]
    for k in (
        "fd",
        "kid",
        "precision",
        "recall",
        "density",
        "coverage",
        "ms_ssim_synthetic",
        "class_fidelity_auroc",
        "memorisation_fraction",
        "anomaly_auroc",
    ):
        assert np.isfinite(m[k]), k
        assert m[f"{k}_lo"] <= m[k] + 1e-9 and m[k] <= m[f"{k}_hi"] + 1e-9, k
    assert m["n_fake"] == m["n_real"] == 12
    assert len(res["meta"]["extractor_sha256"]) == 64
    saved = json.loads(
        (tmp_path / "ev" / next((tmp_path / "ev").iterdir()).name / "metrics.json").read_text()
    )
    assert saved["meta"]["extractor_sha256"] == res["meta"]["extractor_sha256"]
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    arts = {a.path for a in client.list_artifacts(res["run_id"], "report")}
    assert {"report/report.md", "report/closest_pairs.png", "report/interpolation.png"} <= arts


def _normal_only_model(tmp_path, manifest) -> str:
    from pipeline.train import TrainConfig, train

    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={manifest}",
            "data.image_size=32",
            "data.batch_size=8",
            "data.labels=[0]",
            "model.kind=vae",
            "model.latent_dim=8",
            "model.base_channels=8",
            "epochs=1",
            "grid_size=4",
            f"out_dir={tmp_path / 'anom'}",
            f"tracking.uri=sqlite:///{tmp_path / 'anom.db'}",
            "tracking.log_model=false",
        ],
    )
    return train(cfg)["checkpoint"]


def test_evaluate_validation():
    from pipeline.evaluate import EvaluateConfig

    with pytest.raises(ConfigError, match="checkpoint is required"):
        load_config(EvaluateConfig, None, [])
    with pytest.raises(ConfigError, match="extractor is required"):
        load_config(EvaluateConfig, None, ["checkpoint=a.pt"])
    with pytest.raises(ConfigError, match="k must be >= 1"):
        load_config(EvaluateConfig, None, ["checkpoint=a.pt", "extractor=b.pt", "k=0"])


def test_frechet_distance_matches_the_closed_form_and_monai():
    # exact sample moments: whitened samples scaled per axis give diagonal covariances a and b
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 6, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance = I
    a = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    b = torch.tensor([2.0, 1, 1, 9, 5, 0.5], dtype=torch.float64)
    mu = torch.tensor([0.5, 0, 0, -1, 0, 0], dtype=torch.float64)
    x, y = z * a.sqrt() + mu, z * b.sqrt()
    expected = float(mu @ mu + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert Q.frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    from monai.metrics import FIDMetric

    try:  # MONAI's own implementation, where the installed SciPy still accepts its call
        monai_fd = float(FIDMetric()(x, y))
    except TypeError:
        pytest.skip("MONAI's FIDMetric fails with this SciPy (sqrtm's disp argument was removed)")
    assert Q.frechet_distance(x, y) == pytest.approx(monai_fd, rel=1e-9)


def test_evaluate_takes_a_model_uri(tmp_path, phantom_manifest, phantom_generator, phantom_extractor):
    """Every stage that takes a checkpoint takes an MLflow model URI: evaluate scores the logged
    generator, finds its training data through the model's run (no reference= needed) and records
    the lineage."""
    from pipeline.evaluate import EvaluateConfig, evaluate

    res = evaluate(
        load_config(
            EvaluateConfig,
            None,
            [
                f"checkpoint=runs:/{phantom_generator['run_id']}/generator",
                f"extractor={phantom_extractor}",
                "bootstrap=10",
                "k=3",
                f"out_dir={tmp_path / 'ev'}",
                f"tracking.uri={phantom_generator['uri']}",
            ],
        )
    )
    assert np.isfinite(res["metrics"]["fd"]) and np.isfinite(res["metrics"]["class_fidelity_auroc"])
    assert res["meta"]["reference"] == str(phantom_manifest)  # from the generator's run
    assert res["meta"]["generator_run_id"] == phantom_generator["run_id"]
