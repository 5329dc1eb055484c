from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _speed_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("speed") / "speed.json")


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch, _speed_cache):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # speed.mode=auto's per-machine choices go to a cache of this pytest run, not the user's ~/.cache
    # (and a stage run by a test times its measures once per size and batch, then reads them)
    monkeypatch.setenv("CXR_VAEGAN_SPEED_CACHE", _speed_cache)
    # mlflow.set_tracking_uri / set_registry_uri also write these variables: without this, one
    # test's store would leak into the next test's subprocesses and default stores
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory):
    """A tiny embedded-default data set (procedural phantoms), ingested into a manifest."""
    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.stage import ingest
    from transforms.phantoms import ensure_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    ensure_phantom_dataset(root / "png", n_per_class=20, n_test_per_class=6, size=64, seed=0)
    out = root / "phantoms.csv"
    ingest(IngestConfig(source=str(root / "png"), out=str(out), val_fraction=0.2))
    return out


@pytest.fixture(scope="session")
def phantom_generator(tmp_path_factory, phantom_manifest):
    """A tiny class-conditioned VAE-GAN (32 px, 1 epoch) trained on the phantoms: its checkpoint."""
    from pipeline.infra.config import load_config
    from pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp("generator")
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            "data.image_size=32",
            "data.batch_size=8",
            "model.latent_dim=8",
            "model.base_channels=8",
            "model.max_channels=32",
            "model.disc_channels=8",
            "model.num_classes=2",
            "epochs=1",
            "grid_size=8",
            "threads=1",
            f"out_dir={root / 'out'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "tracking.register_model=''",
            "tracking.log_every=5",
        ],
    )
    res = train(cfg)
    return {
        "checkpoint": res["checkpoint"],
        "run_id": res["run_id"],
        "uri": f"sqlite:///{root / 'mlflow.db'}",
    }


@pytest.fixture(scope="session")
def phantom_extractor(tmp_path_factory, phantom_manifest):
    """A tiny classifier (32 px, 1 epoch) trained on the phantoms: the feature extractor that
    evaluate needs. Its checkpoint path."""
    from pipeline.classify import ClassifyConfig, classify
    from pipeline.infra.config import load_config

    root = tmp_path_factory.mktemp("extractor")
    cfg = load_config(
        ClassifyConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            "data.image_size=32",
            "model.widths=[8,16,16,16]",
            "epochs=1",
            "bootstrap=20",
            "threads=1",
            f"out_dir={root / 'cls'}",
            f"tracking.uri=sqlite:///{root / 'cls.db'}",
        ],
    )
    return classify(cfg)["checkpoint"]
