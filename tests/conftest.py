from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory):
    """A tiny embedded-default data set (procedural phantoms), ingested into a manifest."""
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.phantoms import ensure_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    ensure_phantom_dataset(root / "png", n_per_class=20, n_test_per_class=6, size=64, seed=0)
    out = root / "phantoms.csv"
    ingest(IngestConfig(source=str(root / "png"), out=str(out), val_fraction=0.2))
    return out
