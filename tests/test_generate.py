from __future__ import annotations

import json
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from pipeline.generate import GenerateConfig, generate
from pipeline.infra.checkpoint import CheckpointError
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.loaders import load_generator, resolve_labels, sample_images
from transforms.io import read_image


def _cfg(tmp_path, ckpt, out, *extra):
    return load_config(
        GenerateConfig,
        None,
        [
            f"checkpoint={ckpt}",
            f"out={tmp_path / out}",
            f"tracking.uri=sqlite:///{tmp_path / 'gen.db'}",
            *extra,
        ],
    )


def test_same_seed_same_images_other_seed_differs(tmp_path, phantom_generator):
    ck = phantom_generator["checkpoint"]
    a = generate(_cfg(tmp_path, ck, "a", "n=12", "seed=3", "batch_size=5"))
    b = generate(_cfg(tmp_path, ck, "b", "n=12", "seed=3", "batch_size=12", "log_mlflow=false"))
    c = generate(_cfg(tmp_path, ck, "c", "n=12", "seed=4", "log_mlflow=false"))
    da, db, dc = (pd.read_csv(r["manifest"]) for r in (a, b, c))
    # identical pixels whatever the batch size; a different seed gives different images
    assert list(da["pixel_hash"]) == list(db["pixel_hash"])
    assert len(set(da["pixel_hash"]) & set(dc["pixel_hash"])) == 0
    assert a["run_id"] is not None and b["run_id"] is None


def test_manifest_records_label_seed_and_source_hash(tmp_path, phantom_generator):
    from transforms.io import file_sha256
    from transforms.manifest import read_manifest

    ck = phantom_generator["checkpoint"]
    res = generate(_cfg(tmp_path, ck, "g", "n=6", "label=balanced", "seed=7"))
    df, root = read_manifest(res["manifest"])
    assert list(df["label"]) == [0, 1, 0, 1, 0, 1]
    assert set(df["label_name"]) == {"normal", "pneumonia"}
    assert set(df["seed"]) == {7} and list(df["index"]) == list(range(6))
    assert set(df["source_sha256"]) == {file_sha256(ck)}
    # every row points at a real PNG of the generator's size
    img, info = read_image(df["abs_path"][0])
    assert img.shape == (32, 32)
    one = generate(_cfg(tmp_path, ck, "p", "n=3", "label=pneumonia", "log_mlflow=false"))
    assert set(pd.read_csv(one["manifest"])["label_name"]) == {"pneumonia"}


def test_dicom_secondary_capture_is_marked_synthetic_and_carries_no_patient(tmp_path, phantom_generator):
    res = generate(
        _cfg(tmp_path, phantom_generator["checkpoint"], "d", "n=2", "dicom=true", "log_mlflow=false")
    )
    files = sorted((tmp_path / "d" / "dicom").glob("*.dcm"))
    assert len(files) == 2
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    assert ds.ConversionType == "SYN" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert "synthetic" in ds.DerivationDescription.lower()
    assert (
        str(ds.PatientName) == "" and ds.PatientID == "" and ds.PatientBirthDate == "" and ds.StudyDate == ""
    )
    # the DICOM holds the same pixels as the PNG
    png, _ = read_image(tmp_path / "d" / pd.read_csv(res["manifest"])["path"][0])
    dcm, _ = read_image(files[0])
    np.testing.assert_array_equal(png, dcm)


def test_loads_from_mlflow_model_uri(tmp_path, phantom_manifest):
    """The registered MLflow model generates the same images as the checkpoint it came from."""
    import mlflow

    from pipeline.train import TrainConfig, train

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={phantom_manifest}",
            "data.image_size=32",
            "data.batch_size=16",
            "data.max_train=16",
            "model.latent_dim=8",
            "model.base_channels=8",
            "model.num_classes=2",
            "epochs=1",
            "grid_size=4",
            "threads=1",
            f"out_dir={tmp_path / 'out'}",
            f"tracking.uri={uri}",
            "tracking.register_model=g",
        ],
    )
    res = train(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    a = load_generator(res["checkpoint"])
    b = load_generator("models:/g/1")
    assert b.label_names == {0: "normal", 1: "pneumonia"}
    # lineage: both know the training run that made them
    assert a.run_id == b.run_id == res["run_id"]
    labels = resolve_labels("balanced", 4, a)
    # the fitted prior travels in the model's weights: the same images, not N(0, I) ones
    assert a.generator.prior.is_fitted and b.generator.prior.is_fitted
    torch.testing.assert_close(sample_images(a, labels, 0), sample_images(b, labels, 0))


def test_fitted_prior_round_trips_through_the_checkpoint_and_prior_normal_turns_it_off(
    tmp_path, phantom_generator, capsys
):
    from pipeline.evaluate import load_vaegan
    from pipeline.infra.checkpoint import load_checkpoint
    from transforms.manifest import sidecar_path

    ck = phantom_generator["checkpoint"]
    payload = load_checkpoint(ck)
    assert bool(payload["prior"]["fitted"])  # train fitted it to the training codes at the epoch end
    model, _, _ = load_vaegan(ck)
    labels = np.array([0, 1, 0, 1])
    # the generator rebuilt from the checkpoint draws what the trained model draws
    torch.testing.assert_close(
        sample_images(load_generator(ck), labels, 5),
        model.generator().sample(torch.as_tensor(labels), seed=5),
    )
    fitted = generate(_cfg(tmp_path, ck, "f", "n=4", "log_mlflow=false"))
    normal = generate(_cfg(tmp_path, ck, "n", "n=4", "prior=normal", "log_mlflow=false"))
    assert (fitted["prior"], normal["prior"]) == ("fitted", "normal")
    # recorded with the set
    assert json.loads(sidecar_path(normal["manifest"]).read_text())["prior"] == "normal"
    hashes = {k: list(pd.read_csv(r["manifest"])["pixel_hash"]) for k, r in (("f", fitted), ("n", normal))}
    assert hashes["f"] != hashes["n"]
    # a checkpoint from before the prior existed draws from N(0, I), and says so
    old = {k: v for k, v in payload.items() if k != "prior"}
    torch.save(old, tmp_path / "old.pt")
    capsys.readouterr()
    res = generate(_cfg(tmp_path, tmp_path / "old.pt", "o", "n=4", "log_mlflow=false"))
    assert res["prior"] == "normal" and "carries no fitted prior" in capsys.readouterr().out
    assert list(pd.read_csv(res["manifest"])["pixel_hash"]) == hashes["n"]
    with pytest.raises(ConfigError, match="prior must be one of"):
        load_config(GenerateConfig, None, ["checkpoint=x.pt", "prior=gmm"])


def test_validation_rules(tmp_path, phantom_generator):
    with pytest.raises(ConfigError, match="checkpoint is required"):
        load_config(GenerateConfig, None, [])
    with pytest.raises(ConfigError, match="n must be >= 1"):
        load_config(GenerateConfig, None, ["checkpoint=x.pt", "n=0"])
    with pytest.raises(ValueError, match="not a class of this generator"):
        generate(_cfg(tmp_path, phantom_generator["checkpoint"], "x", "label=cat", "log_mlflow=false"))
    with pytest.raises(CheckpointError, match="does not exist"):
        generate(_cfg(tmp_path, tmp_path / "missing.pt", "y", "log_mlflow=false"))


def test_drop_near_copies_replaces_flagged_images(tmp_path, phantom_generator, phantom_manifest, monkeypatch):
    """Force every first draw to be a training image: the option must replace all of them."""
    import pipeline.generate as G
    from pipeline.infra.loaders import load_images

    train_x, _ = load_images(phantom_manifest, "train", 32)
    real_chunks = G.sample_chunks
    calls = {"n": 0}

    def first_draw_copies(lg, labels, seed, batch_size=256, prior="fitted"):
        calls["n"] += 1
        for start, out in real_chunks(lg, labels, seed, batch_size, prior):
            if calls["n"] == 1 and start == 0:
                out[: min(len(out), 3)] = train_x[:3]
            yield start, out

    monkeypatch.setattr(G, "sample_chunks", first_draw_copies)
    res = generate(
        _cfg(
            tmp_path,
            phantom_generator["checkpoint"],
            "nc",
            "n=5",
            f"drop_near_copies={phantom_manifest}",
            "log_mlflow=false",
        )
    )
    assert res["near_copies_dropped"] >= 3
    imgs = torch.stack(
        [torch.from_numpy(read_image(tmp_path / "nc" / p)[0]) for p in pd.read_csv(res["manifest"])["path"]]
    )
    train_u8 = ((train_x[:3, 0] + 1) * 127.5).round()
    for t in train_u8:
        assert not any(torch.equal(t, (im * 255).round()) or torch.equal(t, im) for im in imgs)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_disk_full_mid_write_names_the_file_and_leaves_nothing_half_written(
    tmp_path, phantom_generator, monkeypatch
):
    """ENOSPC on the 4th PNG: a clear error naming that file; the folder keeps its previous
    complete set (here: an earlier generate), never a mix or images without a manifest."""
    import errno

    from PIL import Image

    ck = phantom_generator["checkpoint"]
    out = tmp_path / "full"
    generate(_cfg(tmp_path, ck, "full", "n=2", "log_mlflow=false"))
    before = {p: (out / p).read_bytes() for p in _files(out)}
    real_save, saved = Image.Image.save, {"n": 0}

    def save_until_full(self, fp, *args, **kwargs):
        if saved["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved["n"] += 1
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    for extra in ((), ("overwrite=true",)):  # a first set in an empty place, and replacing a set
        saved["n"] = 0
        target = out if extra else tmp_path / "fresh"
        with pytest.raises(OSError, match="disk full at") as e:
            generate(_cfg(tmp_path, ck, target.name, "n=6", "log_mlflow=false", *extra))
        assert str(target / "images" / "syn_000003_pneumonia.png") in str(e.value)
    # all or nothing: the earlier set is intact, the failed first set left no folder, no staging
    assert {p: (out / p).read_bytes() for p in _files(out)} == before
    listed = pd.read_csv(out / "generated.csv")["path"]
    assert sorted(listed) == [p for p in _files(out) if p.startswith("images/")]
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_too_little_free_space_is_refused_before_anything_is_written(
    tmp_path, phantom_generator, monkeypatch
):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "small"
    with pytest.raises(OSError, match="bytes") as e:
        generate(
            _cfg(tmp_path, phantom_generator["checkpoint"], "small", "n=50", "dicom=true", "log_mlflow=false")
        )
    msg = str(e.value)
    assert str(out) in msg and "4,096 bytes free" in msg
    # 50 PNGs + 50 DICOMs of 32 x 32 need more than 100 KiB: the estimate is stated in bytes
    assert int(re.search(r"needs about ([\d,]+) bytes", msg).group(1).replace(",", "")) > 100 * 1024
    assert list(tmp_path.iterdir()) == []


def test_dicoms_of_one_call_share_one_study_and_one_series(tmp_path, phantom_generator):
    generate(_cfg(tmp_path, phantom_generator["checkpoint"], "s", "n=3", "dicom=true", "log_mlflow=false"))
    ds = [pydicom.dcmread(p) for p in sorted((tmp_path / "s" / "dicom").glob("*.dcm"))]
    assert len(ds) == 3
    assert len({d.StudyInstanceUID for d in ds}) == 1
    assert len({d.SeriesInstanceUID for d in ds}) == 1
    assert len({d.SOPInstanceUID for d in ds}) == 3
    assert ds[0].StudyInstanceUID != ds[0].SeriesInstanceUID
    generate(_cfg(tmp_path, phantom_generator["checkpoint"], "s2", "n=1", "dicom=true", "log_mlflow=false"))
    other = pydicom.dcmread(next((tmp_path / "s2" / "dicom").glob("*.dcm")))
    assert other.StudyInstanceUID != ds[0].StudyInstanceUID  # one study per call


def test_existing_folder_is_refused_unless_overwrite_replaces_it(tmp_path, phantom_generator):
    from transforms.manifest import read_manifest

    ck = phantom_generator["checkpoint"]
    out = tmp_path / "o"
    first = generate(_cfg(tmp_path, ck, "o", "n=16"))  # logs to MLflow: the tracker writes into o/
    assert first["run_id"] is not None and len(list((out / "images").glob("*.png"))) == 16
    with pytest.raises(ValueError, match="overwrite=true") as e:
        generate(_cfg(tmp_path, ck, "o", "n=2", "log_mlflow=false"))
    assert str(out) in str(e.value) and "out=" in str(e.value)
    assert len(list((out / "images").glob("*.png"))) == 16
    res = generate(_cfg(tmp_path, ck, "o", "n=2", "overwrite=true", "dicom=true"))
    assert res["run_id"] is not None
    assert len(list((out / "images").glob("*.png"))) == 2 and len(list((out / "dicom").glob("*.dcm"))) == 2
    df, root = read_manifest(res["manifest"])
    assert len(df) == 2 and root == out.resolve() and all(map(lambda p: Path(p).is_file(), df["abs_path"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left beside it
    # an outbox of the earlier run still waiting for the server is not thrown away by overwrite
    (out / "tracking_outbox").mkdir(exist_ok=True)
    (out / "tracking_outbox" / "ops.jsonl").write_text('{"seq": 1, "op": "metrics"}\n')
    with pytest.raises(ValueError, match="pipeline.run sync"):
        generate(_cfg(tmp_path, ck, "o", "n=2", "overwrite=true", "log_mlflow=false"))
    assert len(list((out / "images").glob("*.png"))) == 2
