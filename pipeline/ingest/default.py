"""The manifest a stage reads when given none: the embedded phantom data set, generated and
ingested once (again whenever the phantoms change). Train, classify, evaluate and gain import it
from here: it runs the ingest stage, so it sits with ingest, not in ``pipeline/infra`` (which never
imports a stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.infra.stage_configs import DataConfig
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.stage import ingest
from transforms.manifest import ManifestError
from transforms.phantoms import ensure_phantom_dataset

# the embedded default data set: train, classify, evaluate and gain run ingest on it when no
# manifest is given
PHANTOM_MANIFEST = "data_manifests/phantoms.csv"


def default_manifest() -> Path:
    """Generate (once) and ingest the embedded phantom data set; return its manifest."""
    manifest = Path(PHANTOM_MANIFEST)
    root = ensure_phantom_dataset()
    stamp = (root / "phantoms.json").read_text()
    side = manifest.with_suffix(".phantoms-stamp")
    if not manifest.is_file() or not side.is_file() or side.read_text() != stamp:
        ingest(IngestConfig(source=str(root), out=str(manifest), val_fraction=0.1))
        side.write_text(stamp)
    return manifest


def resolve_manifest(cfg: DataConfig) -> Path:
    """``data.manifest``, checked to exist; the phantom manifest (:func:`default_manifest`) when empty."""
    if not cfg.manifest:
        return default_manifest()
    p = Path(cfg.manifest)
    if not p.is_file():
        raise ManifestError(
            f"data.manifest {p} does not exist (run `python -m pipeline.run ingest SOURCE` first)"
        )
    return p
