"""Synthesis-quality metrics on known cases built from the embedded phantom data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.infra import quality as Q
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.metrics import mean_with_ci


@pytest.fixture(scope="module")
def phantoms(phantom_manifest):
    from pipeline.infra.loaders import load_images

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
    m, lo, hi = mean_with_ci(v)
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
                f"judge={phantom_extractor}",
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

    with pytest.raises(ConfigError, match="checkpoint is required .*or samples="):
        load_config(EvaluateConfig, None, [])
    with pytest.raises(ConfigError, match="give checkpoint or samples, not both"):
        load_config(
            EvaluateConfig, None, ["checkpoint=a.pt", "samples=s.csv", "judge=b.pt", "reference=r.csv"]
        )
    with pytest.raises(ConfigError, match="samples= needs reference="):
        load_config(EvaluateConfig, None, ["samples=s.csv", "judge=b.pt"])
    cfg = load_config(EvaluateConfig, None, ["samples=s.csv", "judge=b.pt", "reference=r.csv"])
    assert cfg.samples == "s.csv" and cfg.checkpoint == ""
    with pytest.raises(ConfigError, match="judge is required"):
        load_config(EvaluateConfig, None, ["checkpoint=a.pt"])
    with pytest.raises(ConfigError, match="k must be >= 1"):
        load_config(EvaluateConfig, None, ["checkpoint=a.pt", "judge=b.pt", "k=0"])


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
                f"judge={phantom_extractor}",
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


# ------------------------------------------------------------------ samples=: images from any generator
def _evaluate(tmp_path, phantom_extractor, reference, *source: str, name: str = "ev"):
    from pipeline.evaluate import EvaluateConfig, evaluate

    return evaluate(
        load_config(
            EvaluateConfig,
            None,
            [
                *source,
                f"judge={phantom_extractor}",
                f"reference={reference}",
                "bootstrap=10",
                "k=3",
                f"out_dir={tmp_path / name}",
                f"tracking.uri=sqlite:///{tmp_path / 'ev.db'}",
            ],
        )
    )


def test_evaluate_scores_samples_from_a_manifest_or_a_folder(
    tmp_path, phantom_manifest, phantom_generator, phantom_extractor
):
    """``samples=`` scores images another program made, on the same panel: a labelled manifest
    (generate's generated.csv) gets class fidelity, a folder of PNGs (no labels) does not; neither
    has an interpolation grid (no encoder); the report, metrics.json and MLflow record the source."""
    import json
    from pathlib import Path

    import mlflow

    from pipeline.generate import GenerateConfig, generate
    from transforms.io import file_sha256

    gen = generate(
        load_config(
            GenerateConfig,
            None,
            [
                f"checkpoint={phantom_generator['checkpoint']}",
                "n=16",
                f"out={tmp_path / 'gen'}",
                "log_mlflow=false",
            ],
        )
    )
    csv = Path(gen["manifest"])
    res = _evaluate(tmp_path, phantom_extractor, phantom_manifest, f"samples={csv}", name="ev-csv")
    m, meta = res["metrics"], res["meta"]
    for k in ("fd", "kid", "precision", "recall", "coverage", "ms_ssim_synthetic", "memorisation_fraction"):
        assert np.isfinite(m[k]), k
    assert np.isfinite(m["class_fidelity_auroc"])  # from the manifest's labels
    assert m["n_fake"] == 16 and m["n_real"] == 12
    assert meta["samples"] == str(csv) and meta["samples_sha256"] == file_sha256(csv)
    assert meta["samples_files"] == 16 and meta["model_kind"] == "samples"
    assert meta["samples_generator"] == phantom_generator["checkpoint"]  # lineage from generate's sidecar
    assert "checkpoint" not in meta and "checkpoint_sha256" not in meta
    run_dir = Path(res["report"]).parent
    assert not (run_dir / "interpolation.png").exists() and (run_dir / "samples.png").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["meta"]["samples_sha256"] == file_sha256(csv)
    assert f"`{csv}`" in Path(res["report"]).read_text()
    run = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'ev.db'}").get_run(res["run_id"])
    assert run.data.tags["samples_sha256"] == file_sha256(csv) and run.data.tags["samples_files"] == "16"
    assert run.data.params["samples"] == str(csv) and run.data.params["checkpoint"] == ""

    # a folder of images: unlabelled, so no class fidelity; n caps the number used
    folder = csv.parent / "images"
    res = _evaluate(tmp_path, phantom_extractor, phantom_manifest, f"samples={folder}", "n=10", name="ev-dir")
    m, meta = res["metrics"], res["meta"]
    for k in ("fd", "kid", "precision", "recall", "coverage", "ms_ssim_synthetic", "memorisation_fraction"):
        assert np.isfinite(m[k]), k
    assert "class_fidelity_auroc" not in m and m["n_fake"] == 10
    assert (
        meta["samples"] == str(folder) and meta["samples_files"] == 16 and len(meta["samples_sha256"]) == 64
    )
    assert not (Path(res["report"]).parent / "interpolation.png").exists()


def test_samples_score_like_the_generator_they_came_from(
    tmp_path, monkeypatch, phantom_manifest, phantom_generator, phantom_extractor
):
    """``samples=`` is the same computation as ``checkpoint=`` for the same pixels: the images
    evaluate draws from the generator (seed 0, n = the reference's 12, labels following its class
    mix), written as PNGs with a hand-written manifest, score exactly as a ``checkpoint=`` run whose
    generator returns those images as read back.

    Why not the generator's own tensors: samples are read like real images (8-bit PNG, then the
    reference's per-image 0.5-99.5 percentile clip and rescale to [-1, 1], as classify reads a
    generated.csv), which the generator's tensors skip. For a trained generator whose images span
    the intensity range that is close to the identity; this 1-epoch phantom generator draws
    near-flat grey images (MS-SSIM between them 0.999) that the rescale stretches to full contrast,
    so FD and MS-SSIM there differ far beyond 8-bit quantisation (FD about 1.2 vs 0.7)."""
    from PIL import Image

    import pipeline.evaluate
    from pipeline.evaluate import load_samples, load_source
    from pipeline.generate import to_uint8
    from pipeline.infra.loaders import load_images

    _, real_y = load_images(phantom_manifest, "test", 32)
    fake_x, syn_y = load_source(phantom_generator["checkpoint"], "cpu", "").images(real_y, 32, 0, 0, 256)
    (tmp_path / "png").mkdir()
    rows = ["path,label,split"]  # any manifest with path/label columns; the split does not matter
    for i, (img, y) in enumerate(zip(fake_x, syn_y, strict=True)):
        Image.fromarray(to_uint8(img)).save(tmp_path / "png" / f"s{i:03d}.png")
        rows.append(f"png/s{i:03d}.png,{int(y)},{('train', 'val', 'test')[i % 3]}")
    csv = tmp_path / "samples.csv"
    csv.write_text("\n".join(rows) + "\n")
    read_x, read_y = load_samples(csv).images(real_y, 32, 0, 0, 256)
    assert read_x.shape == fake_x.shape and (read_y == syn_y).all()  # every row, in order

    def as_read_back(lg, labels, seed, batch_size=256, prior="fitted"):
        assert (labels == syn_y).all() and seed == 0
        return read_x.clone()

    got = _evaluate(tmp_path, phantom_extractor, phantom_manifest, f"samples={csv}", name="ev-samples")
    monkeypatch.setattr(pipeline.evaluate, "sample_images", as_read_back)
    ref = _evaluate(
        tmp_path,
        phantom_extractor,
        phantom_manifest,
        f"checkpoint={phantom_generator['checkpoint']}",
        name="ev-ckpt",
    )
    a, b = ref["metrics"], got["metrics"]
    assert set(a) == set(b) and b["n_fake"] == 12 and "class_fidelity_auroc" in b
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
