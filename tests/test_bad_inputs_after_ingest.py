"""Images that change after ingest, and sample folders or sidecars that point outside themselves
(issue 24, item 9): a run skips and reports what it cannot read instead of stopping with a
traceback, refuses when too much is gone, and never reads outside the data it was given."""

from __future__ import annotations

import json
import shutil

import pytest
from cxr_factory import TINY_GAIN_CLASSIFY, TINY_TRAIN

from pipeline.infra.config import load_config
from pipeline.infra.data import UnreadableImagesError
from transforms.manifest import ManifestError, read_manifest


@pytest.fixture
def own_phantoms(tmp_path, phantom_manifest):
    """A private copy of the phantom data and its manifest (the test damages its images)."""
    from pipeline.ingest.config import IngestConfig
    from pipeline.ingest.stage import ingest

    src = phantom_manifest.parent / "png"
    shutil.copytree(src, tmp_path / "png")
    out = tmp_path / "m.csv"
    ingest(IngestConfig(source=str(tmp_path / "png"), out=str(out), val_fraction=0.2))
    return out


def _damage(manifest, split: str, k: int) -> list[str]:
    df, _ = read_manifest(manifest, split)
    files = list(df["abs_path"])[:k]
    for f in files:
        with open(f, "r+b") as fh:  # a truncated, garbled file: what a bad copy leaves
            fh.truncate(40)
    return files


def test_classify_skips_and_reports_training_images_damaged_after_ingest(tmp_path, own_phantoms):
    from pipeline.classify import ClassifyConfig, classify

    _damage(own_phantoms, "train", 2) + _damage(own_phantoms, "val", 1)
    cfg = load_config(
        ClassifyConfig,
        None,
        [
            f"data.manifest={own_phantoms}",
            *(o.removeprefix("classify.") for o in TINY_GAIN_CLASSIFY),
            f"out_dir={tmp_path / 'out'}",
            f"tracking.uri=sqlite:///{tmp_path / 'c.db'}",
            "tracking.run_name=r",
        ],
    )
    res = classify(cfg)  # before: a traceback from the loader
    import mlflow

    run = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'c.db'}").get_run(res["run_id"])
    assert run.data.params["data.skipped_images"] == "3"
    # a test image is not skipped: a test set scored without it would not pair with the runs
    # scored with it (a study's paired statistics), so the run is refused, naming the file
    bad = _damage(own_phantoms, "test", 1)
    with pytest.raises(
        ValueError, match=rf"test split 'test' cannot be read any more.*{bad[0].split('/')[-1]}"
    ):
        classify(cfg)


def test_train_refuses_a_split_mostly_unreadable_naming_files(tmp_path, own_phantoms):
    from pipeline.train import TrainConfig, train

    n = len(read_manifest(own_phantoms, "train")[0])
    bad = _damage(own_phantoms, "train", n)  # all of them
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={own_phantoms}",
            *TINY_TRAIN,
            "epochs=1",
            f"out_dir={tmp_path / 'out'}",
            f"tracking.uri=sqlite:///{tmp_path / 't.db'}",
        ],
    )
    with pytest.raises(
        UnreadableImagesError, match=rf"images cannot be read any more: .*{bad[0].split('/')[-1]}"
    ):
        train(cfg)


def test_evaluate_samples_refuse_links_out_of_their_folder(tmp_path, own_phantoms):
    from pipeline.evaluate import load_samples

    folder = tmp_path / "samples"
    folder.mkdir()
    real = read_manifest(own_phantoms, "test")[0]["abs_path"].iloc[0]
    shutil.copy(real, folder / "a.png")
    (folder / "b.png").symlink_to(real)  # points outside the folder
    with pytest.raises(ValueError, match="link outside it"):
        load_samples(folder)


def test_a_sidecar_whose_data_root_is_the_file_system_root_is_refused(tmp_path, own_phantoms):
    side = own_phantoms.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["data_root"] = "/"  # then a row "etc/passwd" would be read
    side.write_text(json.dumps(meta))
    with pytest.raises(ManifestError, match="file system's root"):
        read_manifest(own_phantoms)
