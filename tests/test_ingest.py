from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cxr_factory import REPO, SHARED, chest_like, make_dicom, make_png, needs_shared

from pipeline.ingest import IngestConfig, carve_val_by_patient, ingest, patient_from_filename
from pipeline.manifest import may_hold_burned_in, read_manifest


def _good_folder(root, n=6):
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                make_png(
                    root / split / cls / f"person{i}_{cls.lower()}_{split}.png",
                    chest_like(40, 36, np.uint8, seed=i * 7 + len(cls) + len(split)),
                )


def test_kaggle_layout_folder(tmp_path):
    _good_folder(tmp_path / "src")
    res = ingest(IngestConfig(source=str(tmp_path / "src"), out=str(tmp_path / "m.csv"), val_fraction=0.25))
    df, root = read_manifest(tmp_path / "m.csv")
    assert res.rows == 24 and len(df) == 24
    assert (df["split"] == "test").sum() == 12
    assert set(df["label_name"]) == {"normal", "pneumonia"}
    assert df.loc[df["label_name"] == "normal", "label"].eq(0).all()
    assert set(df.loc[df["split"] != "test", "split"]) == {"train", "val"}
    tr, va = set(df.loc[df.split == "train", "patient_id"]), set(df.loc[df.split == "val", "patient_id"])
    assert not tr & va
    assert all((root / p).is_file() for p in df["path"])
    assert {"height", "width", "bits_stored", "photometric", "pixel_hash", "format"} <= set(df.columns)


def test_val_split_never_shares_a_patient():
    df = pd.DataFrame(
        {
            "patient_id": [f"p{i // 3}" for i in range(90)],
            "label": [(i // 3) % 2 for i in range(90)],
            "split": ["train"] * 80 + ["test"] * 10,
        }
    )
    split = carve_val_by_patient(df, 0.2, seed=1)
    df["s"] = split
    assert (df.loc[df.split == "test", "s"] == "test").all()
    assert not set(df.loc[df.s == "train", "patient_id"]) & set(df.loc[df.s == "val", "patient_id"])
    assert 0 < (df.s == "val").sum() < 80
    assert set(df.loc[df.s == "val", "label"]) == {0, 1}  # stratified


def test_patient_ids_from_kermany_names():
    from pathlib import Path

    assert patient_from_filename(Path("person1000_bacteria_2931.jpeg")) == "person1000"
    assert patient_from_filename(Path("IM-0115-0001.jpeg")) == "IM-0115"
    assert patient_from_filename(Path("NORMAL2-IM-0173-0001-0002.jpeg")) == "NORMAL2-IM-0173"


def test_duplicates_reported_and_cross_split_flagged(tmp_path):
    src = tmp_path / "src"
    a = chest_like(40, 40, np.uint8, seed=1)
    make_png(src / "train" / "NORMAL" / "IM-0001-0001.png", a)
    make_png(src / "test" / "NORMAL" / "IM-0002-0001.png", a)  # same pixels, other split
    make_png(src / "train" / "NORMAL" / "IM-0003-0001.png", chest_like(40, 40, np.uint8, seed=2))
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0))
    assert res.duplicate_groups == 1 and res.cross_split_duplicate_groups == 1
    dups = pd.read_csv(tmp_path / "m.duplicates.csv")
    assert len(dups) == 2 and dups["cross_split"].all()


def test_bad_inputs_are_quarantined_and_the_rest_ingests(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    labels = []
    for i in range(4):
        make_png(src / f"good{i}.png", chest_like(48, 48, np.uint8, seed=i))
        labels.append((f"good{i}.png", "normal" if i % 2 == 0 else "pneumonia"))
    make_dicom(src / "good_dicom.dcm", chest_like(48, 48, np.uint16, seed=9))
    labels.append(("good_dicom.dcm", "pneumonia"))
    # the bad ones
    t = make_dicom(src / "truncated.dcm", chest_like(64, 64, np.uint16))
    t.write_bytes(t.read_bytes()[:2000])
    make_dicom(src / "nopixels.dcm", None)
    (src / "zero.png").write_bytes(b"")
    (src / "text.png").write_text("hello, I am not a PNG\n")
    make_dicom(src / "multiframe.dcm", chest_like(32, 32, np.uint8), frames=4)
    make_png(src / "tiny.png", chest_like(12, 12, np.uint8))
    make_png(src / "badlabel.png", chest_like(48, 48, np.uint8, seed=20))
    for name in ("truncated.dcm", "nopixels.dcm", "zero.png", "text.png", "multiframe.dcm", "tiny.png"):
        labels.append((name, "normal"))
    labels.append(("badlabel.png", "??"))
    pd.DataFrame(labels, columns=["path", "label"]).to_csv(tmp_path / "labels.csv", index=False)

    out = tmp_path / "out" / "mixed.csv"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.run",
        "ingest",
        str(src),
        "--out",
        str(out),
        "--labels",
        str(tmp_path / "labels.csv"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df, _ = read_manifest(out)
    assert sorted(df["path"]) == ["good0.png", "good1.png", "good2.png", "good3.png", "good_dicom.dcm"]
    q = pd.read_csv(out.with_suffix(".quarantine.csv"))
    reasons = {r.file.split("/")[-1]: r.reason for r in q.itertuples()}
    assert set(reasons) == {
        "truncated.dcm",
        "nopixels.dcm",
        "zero.png",
        "text.png",
        "multiframe.dcm",
        "tiny.png",
        "badlabel.png",
    }
    assert "Pixel Data" in reasons["nopixels.dcm"]
    assert "empty file" in reasons["zero.png"]
    assert "not a PNG" in reasons["text.png"]
    assert "multi-frame" in reasons["multiframe.dcm"]
    assert "smaller than the 16 px" in reasons["tiny.png"]
    assert "unreadable label" in reasons["badlabel.png"]
    assert "DICOM" in reasons["truncated.dcm"] or "decode" in reasons["truncated.dcm"]
    assert all("\n" not in r for r in reasons.values())
    assert "quarantined: 7" in proc.stderr


def test_dicom_patient_identifiers_never_in_clear(tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    for i in range(3):
        make_dicom(
            src / f"{i}.dcm",
            chest_like(32, 32, np.uint16, seed=i),
            patient_id="MRN-SECRET-4711",
            patient_name="Doe^Jane",
        )
    out = tmp_path / "m.csv"
    ingest(IngestConfig(source=str(src), out=str(out)))
    df, _ = read_manifest(out)
    assert df["patient_id"].nunique() == 1 and df["patient_id"].iloc[0].startswith("p-")
    assert (df["label"] == -1).all()  # unlabelled allowed
    for f in tmp_path.glob("m*"):
        text = f.read_text()
        for marker in ("MRN-SECRET-4711", "Doe^Jane", "19700101", "20200102"):
            assert marker not in text, f"{marker} leaked into {f.name}"


def _burned_in_folder(src):
    src.mkdir()
    for i in range(4):
        make_dicom(
            src / f"img{i}.dcm",
            chest_like(32, 32, np.uint16, seed=i),
            patient_id=f"P{i % 2}",
            extra={"BurnedInAnnotation": "YES" if i == 3 else "NO"},
        )


def test_burned_in_dicom_is_quarantined_by_default(tmp_path):
    _burned_in_folder(tmp_path / "src")
    res = ingest(IngestConfig(source=str(tmp_path / "src"), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    df, _ = read_manifest(tmp_path / "m.csv")
    assert sorted(df["path"]) == ["img0.dcm", "img1.dcm", "img2.dcm"]
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert [p.rsplit("/", 1)[-1] for p in q["file"]] == ["img3.dcm"]
    assert "BurnedInAnnotation=YES" in q["reason"][0] and "allow_burned_in=true" in q["reason"][0]
    assert len(res.quarantined) == 1
    assert json.loads((tmp_path / "m.json").read_text())["may_hold_burned_in"] is False
    assert may_hold_burned_in(tmp_path / "m.csv") is False


def test_allow_burned_in_ingests_and_flags_the_manifest(tmp_path):
    _burned_in_folder(tmp_path / "src")
    out = tmp_path / "m.csv"
    res = ingest(
        IngestConfig(source=str(tmp_path / "src"), out=str(out), val_fraction=0.0, allow_burned_in=True)
    )
    assert res.rows == 4 and not res.quarantined
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["may_hold_burned_in"] is True and meta["burned_in_paths"] == ["img3.dcm"]
    assert may_hold_burned_in(out) is True
    assert may_hold_burned_in(tmp_path / "nowhere.csv") is False  # no sidecar: nothing flagged


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "pneumoniamnist_small.npz",
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (10, 1)),
        test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        test_labels=np.array([[0], [1], [0], [1]]),
    )
    res = ingest(
        IngestConfig(
            source=str(tmp_path / "pneumoniamnist_small.npz"),
            out=str(tmp_path / "m.csv"),
            extract_dir=str(tmp_path / "ex"),
            val_fraction=0.2,
        )
    )
    df, _ = read_manifest(tmp_path / "m.csv")
    assert res.rows == 14 and res.split_counts["test"] == 4
    assert set(df["label_name"]) <= {"normal", "pneumonia"}


def test_csv_source_with_patient_and_split(tmp_path):
    for i in range(6):
        make_png(tmp_path / "img" / f"{i}.png", chest_like(32, 32, np.uint8, seed=i))
    pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(6)],
            "label": [0, 1, 0, 1, 0, 1],
            "patient_id": ["a", "a", "b", "b", "c", "d"],
            "split": ["train"] * 4 + ["test"] * 2,
        }
    ).to_csv(tmp_path / "src.csv", index=False)
    ingest(IngestConfig(source=str(tmp_path / "src.csv"), out=str(tmp_path / "m.csv"), val_fraction=0.5))
    df, _ = read_manifest(tmp_path / "m.csv")
    assert (df.split == "test").sum() == 2
    assert df.groupby("patient_id")["split"].nunique().max() == 1


def test_ingest_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(IngestConfig(source=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ingest(IngestConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "m.csv")))
    with pytest.raises(ValueError, match="must be a .csv"):
        ingest(IngestConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "m.txt")))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        ingest(IngestConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "afile" / "m.csv")))
    with pytest.raises(ValueError, match="val_fraction"):
        IngestConfig(val_fraction=1.5)


@needs_shared
def test_kermany_manifest(tmp_path):
    out = tmp_path / "kermany.csv"
    res = ingest(IngestConfig(source=str(SHARED / "kermany_pneumonia_224"), out=str(out)))
    df, _ = read_manifest(out)
    assert len(df) == 5840 and res.split_counts["test"] == 624
    tr, va = set(df.loc[df.split == "train", "patient_id"]), set(df.loc[df.split == "val", "patient_id"])
    assert len(va) > 0 and not tr & va
    assert res.duplicate_groups == 30 and res.cross_split_duplicate_groups == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["patients_train_val_shared"] == 0
    # the official test split is kept as it is
    official = pd.read_csv(SHARED / "kermany_pneumonia_224" / "manifest.csv")
    assert set(df.loc[df.split == "test", "path"]) == set(official.loc[official.split == "test", "path"])


@needs_shared
def test_real_dicom_folder_ingests(tmp_path):
    out = tmp_path / "dicom.csv"
    res = ingest(IngestConfig(source=str(SHARED / "dicom_cxr"), out=str(out)))
    df, _ = read_manifest(out)
    assert res.rows == 4 and not res.quarantined
    assert set(df["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert sorted(df["bits_stored"]) == [8, 8, 15, 15]
