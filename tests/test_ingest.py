from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from cxr_factory import REPO, SHARED, chest_like, make_dicom, make_png, needs_shared

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.decode import DecodeBudget
from pipeline.ingest.patients import patient_from_filename, patient_from_path
from pipeline.ingest.stage import carve_val_by_patient, ingest
from pipeline.run import main as run_main
from transforms.io import read_image
from transforms.manifest import may_hold_burned_in, read_manifest


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
        "max_quarantined=0.8",  # 7 of 12 files are bad on purpose
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


# ==================================================================== layouts people actually have
def _ingest_with_table(tmp_path):
    """Ingest the folder tmp_path/src with the labels table tmp_path/t.csv."""
    return ingest(
        IngestConfig(
            source=str(tmp_path / "src"), labels=str(tmp_path / "t.csv"), out=str(tmp_path / "m.csv")
        )
    )


def _img(path, seed):
    return make_png(path, chest_like(36, 32, np.uint8, seed=seed))


def _rows(manifest):
    """path -> (label, label_name, split, patient_id) for every manifest row."""
    df, _ = read_manifest(manifest)
    return {r.path: (r.label, r.label_name, r.split, r.patient_id) for r in df.itertuples()}


def test_symlinked_root_gives_the_same_manifest_as_its_real_path(tmp_path):
    real = tmp_path / "real"
    _good_folder(real, n=3)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    a = ingest(IngestConfig(source=str(real), out=str(tmp_path / "a.csv"), val_fraction=0.3))
    b = ingest(IngestConfig(source=str(link), out=str(tmp_path / "b.csv"), val_fraction=0.3))
    assert a.rows == b.rows == 12 and not b.quarantined
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert json.loads((tmp_path / "b.json").read_text())["data_root_abs"] == str(real.resolve())


def test_symlinked_file_pointing_outside_the_root_is_quarantined(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        _img(src / "normal" / f"n{i}.png", i)
        _img(src / "pneumonia" / f"p{i}.png", 10 + i)
    _img(tmp_path / "outside" / "secret.png", 99)
    (src / "normal" / "escape.png").symlink_to(tmp_path / "outside" / "secret.png")
    (src / "pneumonia" / "alias.png").symlink_to(src / "pneumonia" / "p0.png")  # inside: fine
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    rows = _rows(tmp_path / "m.csv")
    assert "normal/escape.png" not in rows and "pneumonia/alias.png" in rows
    assert res.rows == 7
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert [f.rsplit("/", 1)[-1] for f in q["file"]] == ["escape.png"]
    assert "outside the data root" in q["reason"][0]


def test_split_aliases_and_numbered_class_folders(tmp_path, capsys):
    src = tmp_path / "exported"
    expected = {}
    seed = 0
    for split_dir, split in (("train", "train"), ("valid", "train"), ("testing", "test")):
        for cls_dir, label, name in (("0_normal", 0, "normal"), ("1_abnormal", 1, "abnormal")):
            for _ in range(3):
                seed += 1
                rel = f"{split_dir}/{cls_dir}/img{seed:03d}.png"
                _img(src / rel, seed)
                expected[rel] = (label, name, split, f"img{seed:03d}")
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert _rows(tmp_path / "m.csv") == expected  # every row: label, name, split, patient
    assert not res.quarantined and res.split_counts == {"train": 12, "val": 0, "test": 6}
    assert "split/class" in res.layout
    out = capsys.readouterr().out
    assert "layout: split/class" in out and "valid -> val" in out and "testing -> test" in out


def test_label_names_override_numbered_class_folder_names(tmp_path):
    src = tmp_path / "src"
    for i in range(2):
        _img(src / "0_normal" / f"a{i}.png", i)
        _img(src / "1_abnormal" / f"b{i}.png", 5 + i)
    ingest(
        IngestConfig(
            source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0, label_names=["healthy", "sick"]
        )
    )
    rows = _rows(tmp_path / "m.csv")
    assert {p: r[:2] for p, r in rows.items()} == {
        "0_normal/a0.png": (0, "healthy"),
        "0_normal/a1.png": (0, "healthy"),
        "1_abnormal/b0.png": (1, "sick"),
        "1_abnormal/b1.png": (1, "sick"),
    }


def test_class_then_split_layout(tmp_path):
    src = tmp_path / "src"
    expected = {}
    for cls, label in (("Pneumonia", 1), ("Normal", 0)):
        for split_dir, split in (("training", "train"), ("test", "test")):
            for i in range(2):
                rel = f"{cls}/{split_dir}/person{label}{i}{len(split_dir)}_x.png"
                _img(src / rel, len(expected))
                expected[rel] = (label, cls.lower(), split, f"person{label}{i}{len(split_dir)}")
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert _rows(tmp_path / "m.csv") == expected
    assert res.layout.startswith("class/split")


def test_numbered_and_plain_class_folders_together_are_refused(tmp_path):
    for i, cls in enumerate(("0_normal", "pneumonia")):
        _img(tmp_path / "src" / cls / f"x{i}.png", i)
    with pytest.raises(ValueError, match="numbered"):
        ingest(IngestConfig(source=str(tmp_path / "src"), out=str(tmp_path / "m.csv")))


def test_one_class_and_classes_differing_between_splits_warn(tmp_path, capsys):
    one = tmp_path / "one"
    for i in range(3):
        _img(one / "NORMAL" / f"a{i}.png", i)
    res = ingest(IngestConfig(source=str(one), out=str(tmp_path / "one.csv"), val_fraction=0.0))
    assert any("only one class" in w for w in res.warnings)
    assert "only one class" in capsys.readouterr().err
    two = tmp_path / "two"
    for i in range(2):
        for cls in ("normal", "pneumonia"):
            _img(two / "train" / cls / f"{cls}{i}.png", i + len(cls))
            _img(two / "test" / cls / f"t{cls}{i}.png", 20 + i + len(cls))
        _img(two / "test" / "covid" / f"c{i}.png", 40 + i)
    res = ingest(IngestConfig(source=str(two), out=str(tmp_path / "two.csv"), val_fraction=0.0))
    assert any("covid" in w and "test" in w and "train" in w for w in res.warnings), res.warnings


def test_files_outside_the_recognised_layout_are_quarantined(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "test"):
        for cls in ("normal", "pneumonia"):
            for i in range(3):
                _img(src / split / cls / f"{cls}{split}{i}.png", i + len(cls) + len(split))
    _img(src / "stray.png", 50)  # no split, no class
    _img(src / "train" / "loose.png", 51)  # a split without a class
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert res.rows == 12
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    reasons = {f.rsplit("/", 1)[-1]: r for f, r in zip(q["file"], q["reason"], strict=True)}
    assert set(reasons) == {"stray.png", "loose.png"}
    assert all("recognised layout split/class" in r for r in reasons.values())


# ==================================================================== metadata tables and patient ids
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)


def test_nih_metadata_table_with_a_finding(tmp_path, capsys):
    src = tmp_path / "nih"
    table = [
        ("00000001_000.png", "Cardiomegaly", "0", "1"),
        ("00000001_001.png", "Cardiomegaly|Pneumonia", "1", "1"),
        ("00000002_000.png", "No Finding", "0", "2"),
        ("00000003_000.png", "Pneumonia", "0", "3"),
        ("00000003_001.png", "Effusion|Infiltration", "1", "3"),
    ]
    for i, (name, *_) in enumerate(table):
        _img(src / f"images_00{1 + i // 3}" / "images" / name, i)
    _img(src / "images_002" / "images" / "00000009_000.png", 30)  # not in the table
    lines = [f"{n},{f},{u},{p},58,M,PA,2682,2749,0.143,0.143,\n" for n, f, u, p in table]
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_HEADER + "".join(lines))
    cfg = dict(
        source=str(src), labels=str(tmp_path / "Data_Entry_2017.csv"), finding="Pneumonia", val_fraction=0
    )
    res = ingest(IngestConfig(out=str(tmp_path / "m.csv"), **cfg))
    rows = _rows(tmp_path / "m.csv")
    got = {p.rsplit("/", 1)[-1]: r for p, r in rows.items()}
    assert {n: r[:2] for n, r in got.items()} == {
        "00000001_000.png": (0, "no_pneumonia"),
        "00000001_001.png": (1, "pneumonia"),
        "00000002_000.png": (0, "no_pneumonia"),
        "00000003_000.png": (1, "pneumonia"),
        "00000003_001.png": (0, "no_pneumonia"),
    }
    # Patient ID from the table, pseudonymised: follow-ups of one patient share one id
    assert all(r[3].startswith("p-") for r in got.values())
    assert got["00000001_000.png"][3] == got["00000001_001.png"][3] != got["00000002_000.png"][3]
    assert got["00000003_000.png"][3] == got["00000003_001.png"][3]
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert len(q) == 1 and "00000009_000.png" in q["file"][0] and "not listed in" in q["reason"][0]
    assert res.patient_rules == {"table column 'Patient ID' (pseudonymised)": 5}
    out = capsys.readouterr().out
    assert "1.7 images per patient" in out
    # the user may ask for clear ids
    ingest(IngestConfig(out=str(tmp_path / "c.csv"), clear_patient_ids=True, **cfg))
    clear = {p.rsplit("/", 1)[-1]: r[3] for p, r in _rows(tmp_path / "c.csv").items()}
    assert clear["00000001_001.png"] == "1" and clear["00000003_001.png"] == "3"


def test_multi_label_column_without_a_finding_is_refused(tmp_path):
    _img(tmp_path / "src" / "00000001_000.png", 1)
    (tmp_path / "t.csv").write_text(
        NIH_HEADER + "00000001_000.png,Cardiomegaly|Pneumonia,0,1,5,M,PA,1,1,1,1,\n"
    )
    with pytest.raises(ValueError, match="finding="):
        _ingest_with_table(tmp_path)


def test_chexpert_table_and_folder_patient_ids(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    files = {
        "train/patient00001/study1/view1_frontal.jpg": "1.0",
        "train/patient00001/study2/view1_frontal.jpg": "0.0",
        "train/patient00002/study1/view1_frontal.jpg": "",  # not mentioned: negative
        "train/patient00002/study1/view2_lateral.jpg": "-1.0",  # uncertain
        "valid/patient64541/study1/view1_frontal.jpg": "1.0",
    }
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Pneumonia,Pleural Effusion"]
    for i, (rel, v) in enumerate(files.items()):
        _img(root / rel, i)
        lines.append(f"CheXpert-v1.0-small/{rel},Female,68,Frontal,AP,,{v},1.0")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    res = ingest(
        IngestConfig(
            source=str(root),
            labels=str(root / "train.csv"),
            finding="pneumonia",
            out=str(tmp_path / "m.csv"),
            val_fraction=0,
        )
    )
    rows = _rows(tmp_path / "m.csv")
    assert {p: (r[0], r[3]) for p, r in rows.items()} == {
        "train/patient00001/study1/view1_frontal.jpg": (1, "patient00001"),
        "train/patient00001/study2/view1_frontal.jpg": (0, "patient00001"),
        "train/patient00002/study1/view1_frontal.jpg": (0, "patient00002"),
        "valid/patient64541/study1/view1_frontal.jpg": (1, "patient64541"),
    }
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert len(q) == 1 and "view2_lateral" in q["file"][0] and "uncertain" in q["reason"][0]
    assert res.patient_rules == {"chexpert": 4}
    res = ingest(
        IngestConfig(
            source=str(root),
            labels=str(root / "train.csv"),
            finding="Pneumonia",
            uncertain="positive",
            out=str(tmp_path / "u.csv"),
            val_fraction=0,
        )
    )
    assert _rows(tmp_path / "u.csv")["train/patient00002/study1/view2_lateral.jpg"][0] == 1


@pytest.mark.parametrize(
    "rel,patient,rule",
    [
        ("PNEUMONIA/person1000_bacteria_2931.jpeg", "person1000", "kermany"),
        ("NORMAL/IM-0115-0001.jpeg", "IM-0115", "kermany"),
        ("NORMAL/NORMAL2-IM-0173-0001-0002.jpeg", "NORMAL2-IM-0173", "kermany"),
        ("images_001/images/00000183_001.png", "00000183", "nih-cxr14"),
        ("train/patient00042/study3/view1_frontal.jpg", "patient00042", "chexpert"),
        ("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34.jpg", "p10000032", "mimic-cxr"),
        ("scans/phantom-train00012-0001.png", "phantom-train00012", "file name"),
        ("scans/covid-19-pneumonia-58-prior.jpg", "covid-19-pneumonia-58-prior", "file name"),
    ],
)
def test_patient_ids_from_public_set_naming(rel, patient, rule):
    assert patient_from_path(rel) == (patient, rule)


def test_public_set_folders_without_a_table_get_their_patients(tmp_path, capsys):
    mimic = tmp_path / "mimic-cxr-jpg" / "files"
    rels = {
        "p10/p10000032/s50414267/02aa804e-bde0afdd.jpg": "p10000032",
        "p10/p10000032/s53189527/2a2277a9-b0ded155.jpg": "p10000032",
        "p11/p11000011/s51029426/6ad03ed1-97ee17ee.jpg": "p11000011",
    }
    for i, rel in enumerate(rels):
        make_png(mimic / rel, chest_like(36, 32, np.uint8, seed=i))  # PNG content, .jpg name: sniffed
    res = ingest(IngestConfig(source=str(mimic), out=str(tmp_path / "mimic.csv"), val_fraction=0.5))
    rows = _rows(tmp_path / "mimic.csv")
    assert {p: (r[0], r[3]) for p, r in rows.items()} == {rel: (-1, pid) for rel, pid in rels.items()}
    assert rows[next(iter(rels))][2] == rows[list(rels)[1]][2]  # one patient, one split
    assert res.layout.startswith("nested") and res.patient_rules == {"mimic-cxr": 3}
    nih = tmp_path / "nih"
    names = ["00000183_000.png", "00000183_001.png", "00000183_002.png", "00000200_000.png"]
    for i, name in enumerate(names):
        _img(nih / name, i)
    res = ingest(IngestConfig(source=str(nih), out=str(tmp_path / "nih.csv"), val_fraction=0.5))
    rows = _rows(tmp_path / "nih.csv")
    assert {p: r[3] for p, r in rows.items()} == {n: n[:8] for n in names}
    assert len({rows[n][2] for n in names[:3]}) == 1  # follow-ups stay in one split
    assert res.patient_rules == {"nih-cxr14": 4}
    assert "ids from: nih-cxr14 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "nih.json").read_text())["images_per_patient"] == 2.0


def test_patient_pattern_key(tmp_path):
    src = tmp_path / "src"
    for i in range(4):
        _img(src / f"site1_subj{'AB'[i % 2]}_scan{i}.png", i)
    _img(src / "unnamed.png", 9)
    res = ingest(
        IngestConfig(
            source=str(src),
            out=str(tmp_path / "m.csv"),
            val_fraction=0,
            patient_pattern=r"_(?P<patient>subj\w)_",
        )
    )
    assert {p: r[3] for p, r in _rows(tmp_path / "m.csv").items()} == {
        "site1_subjA_scan0.png": "subjA",
        "site1_subjB_scan1.png": "subjB",
        "site1_subjA_scan2.png": "subjA",
        "site1_subjB_scan3.png": "subjB",
    }
    assert res.patient_rules == {"patient_pattern": 4}
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    assert len(q) == 1 and "unnamed.png" in q["file"][0] and "patient_pattern" in q["reason"][0]


def test_patient_pattern_without_a_patient_group_is_refused():
    with pytest.raises(ValueError, match="named group"):
        IngestConfig(patient_pattern=r"subj\w")


def test_patient_pattern_that_does_not_compile_is_refused():
    with pytest.raises(ValueError, match="regular expression"):
        IngestConfig(patient_pattern=r"(?P<patient>[a-")


def test_source_csv_patient_ids_are_pseudonymised(tmp_path):
    for i in range(4):
        _img(tmp_path / "img" / f"{i}.png", i)
    pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(4)],
            "label": [0, 1, 0, 1],
            "patient_id": ["MRN-77", "MRN-77", "MRN-88", "MRN-99"],
        }
    ).to_csv(tmp_path / "src.csv", index=False)
    ingest(IngestConfig(source=str(tmp_path / "src.csv"), out=str(tmp_path / "m.csv"), val_fraction=0))
    rows = _rows(tmp_path / "m.csv")
    assert rows["img/0.png"][3] == rows["img/1.png"][3] != rows["img/2.png"][3]
    assert all(r[3].startswith("p-") for r in rows.values())
    for f in tmp_path.glob("m*"):
        assert "MRN-" not in f.read_text(), f.name


def test_duplicated_csv_header_is_refused(tmp_path):
    _img(tmp_path / "a.png", 1)
    (tmp_path / "src.csv").write_text("path,label,label\na.png,normal,pneumonia\n")
    with pytest.raises(ValueError, match="'label' appears 2 times"):
        ingest(IngestConfig(source=str(tmp_path / "src.csv"), out=str(tmp_path / "m.csv")))


def test_duplicated_labels_table_header_is_refused(tmp_path):
    _img(tmp_path / "src" / "a.png", 1)
    (tmp_path / "t.csv").write_text("path,path,label\na.png,b.png,normal\n")
    with pytest.raises(ValueError, match="'path' appears 2 times"):
        _ingest_with_table(tmp_path)


def test_formula_like_cells_are_neutralised_and_read_back(tmp_path):
    src = tmp_path / "src"
    names = ["=1+2.png", "+cmd.png", "-1.png", "@sum.png"]
    for i, name in enumerate(names):
        _img(src / "=HYPERLINK(x)" / name, i)
        _img(src / "normal" / f"n{i}.png", 10 + i)
    ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0))
    raw = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    for col in ("path", "label_name", "patient_id"):
        assert not raw[col].str.match(r"[=+\-@]").any(), raw[col].tolist()
    assert (raw["label_name"] == "'=hyperlink(x)").sum() == 4
    df, root = read_manifest(tmp_path / "m.csv")  # read back as the real values
    assert sorted(p.rsplit("/", 1)[-1] for p in df["path"] if p.startswith("=")) == sorted(names)
    assert all((root / p).is_file() for p in df["path"])
    assert set(df["label_name"]) == {"normal", "=hyperlink(x)"}


# ==================================================================== npz
def test_npz_extraction_is_keyed_by_content_not_name(tmp_path):
    rng = np.random.default_rng(0)
    hashes = []
    for k in range(2):
        d = tmp_path / f"copy{k}"
        d.mkdir()
        np.savez(
            d / "set.npz",
            train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
            train_labels=np.array([[k], [k], [1 - k], [1 - k]]),
        )
        ingest(
            IngestConfig(
                source=str(d / "set.npz"),
                out=str(tmp_path / f"m{k}.csv"),
                extract_dir=str(tmp_path / "ex"),
                val_fraction=0,
            )
        )
        df, root = read_manifest(tmp_path / f"m{k}.csv")
        # each row's image is this file's image
        imgs = np.load(d / "set.npz")["train_images"]
        for r in df.itertuples():
            i = int(r.path.rsplit("_", 1)[-1].split(".")[0])
            arr, _ = read_image(root / r.path)
            np.testing.assert_array_equal(arr, imgs[i].astype(np.float32))
        hashes.append(set(df["pixel_hash"]))
    assert not hashes[0] & hashes[1]


def test_npz_uint16_keeps_its_values(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 60000, (3, 30, 30)).astype(np.uint16)
    np.savez(tmp_path / "u16.npz", train_images=imgs, train_labels=np.array([0, 1, 0]))
    ingest(
        IngestConfig(
            source=str(tmp_path / "u16.npz"),
            out=str(tmp_path / "m.csv"),
            extract_dir=str(tmp_path / "ex"),
            val_fraction=0,
        )
    )
    df, root = read_manifest(tmp_path / "m.csv")
    assert len(df) == 3
    for r in df.itertuples():
        arr, info = read_image(root / r.path)
        i = int(r.path.rsplit("_", 1)[-1].split(".")[0])
        np.testing.assert_array_equal(arr, imgs[i].astype(np.float32))  # never wrapped modulo 256
        assert info.bits_stored == 16


def test_npz_float_images_are_scaled_by_their_range(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.random((3, 30, 30)).astype(np.float32)  # [0, 1)
    np.savez(tmp_path / "f.npz", train_images=imgs, train_labels=np.array([0, 1, 0]))
    res = ingest(
        IngestConfig(
            source=str(tmp_path / "f.npz"),
            out=str(tmp_path / "m.csv"),
            extract_dir=str(tmp_path / "ex"),
            val_fraction=0,
        )
    )
    assert res.rows == 3 and not res.quarantined
    df, root = read_manifest(tmp_path / "m.csv")
    lo, hi = float(imgs.min()), float(imgs.max())
    for r in df.itertuples():
        arr, _ = read_image(root / r.path)
        i = int(r.path.rsplit("_", 1)[-1].split(".")[0])
        np.testing.assert_allclose(arr, np.round((imgs[i] - lo) / (hi - lo) * 65535), atol=1)


def test_npz_with_nan_images_is_refused(tmp_path):
    imgs = np.ones((2, 20, 20), np.float32)
    imgs[0, 3, 3] = np.nan
    np.savez(tmp_path / "n.npz", train_images=imgs, train_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        ingest(
            IngestConfig(
                source=str(tmp_path / "n.npz"), out=str(tmp_path / "m.csv"), extract_dir=str(tmp_path / "ex")
            )
        )


def test_npz_with_multi_label_rows_is_refused(tmp_path):
    np.savez(
        tmp_path / "chest.npz",
        train_images=np.zeros((2, 20, 20), np.uint8),
        train_labels=np.array([[0, 1, 0], [1, 0, 0]]),
    )
    with pytest.raises(ValueError, match="3 labels per image"):
        ingest(
            IngestConfig(
                source=str(tmp_path / "chest.npz"),
                out=str(tmp_path / "m.csv"),
                extract_dir=str(tmp_path / "ex"),
            )
        )


# ==================================================================== failing loudly
def _all_bad(src, n=5):
    src.mkdir(parents=True)
    for i in range(n):
        (src / f"bad{i}.png").write_text("not a png")
    make_png(src / "tiny.png", chest_like(8, 8, np.uint8))


def test_every_file_failing_writes_the_quarantine_and_names_the_commonest_reasons(tmp_path):
    _all_bad(tmp_path / "src")
    with pytest.raises(ValueError, match=r"every file failed.*5 x .*not a PNG"):
        ingest(IngestConfig(source=str(tmp_path / "src"), out=str(tmp_path / "m.csv")))
    assert len(pd.read_csv(tmp_path / "m.quarantine.csv")) == 6
    assert not (tmp_path / "m.csv").exists()


def test_cli_exits_non_zero_when_too_many_files_are_quarantined(tmp_path, capsys):
    src = tmp_path / "src"
    _all_bad(src, n=2)
    for i in range(2):
        _img(src / f"good{i}.png", i)
    out = tmp_path / "m.csv"
    rc = run_main(["ingest", str(src), "--out", str(out), "val_fraction=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "3 of 5 files (60%) quarantined" in err and "max_quarantined=0.5" in err
    assert "2 x " in err and "not a PNG" in err  # the commonest reasons, counted
    assert out.with_suffix(".quarantine.csv").is_file() and not out.exists()
    rc = run_main(["ingest", str(src), "--out", str(out), "max_quarantined=0.8", "val_fraction=0"])
    assert rc == 0 and len(read_manifest(out)[0]) == 2


def test_decoding_memory_is_bounded(tmp_path):
    src = tmp_path / "src"
    for i in range(8):
        _img(src / f"i{i}.png", i)
    budget = 36 * 32 * 24 * 3  # room for three of these images at a time
    res = ingest(
        IngestConfig(
            source=str(src),
            out=str(tmp_path / "m.csv"),
            workers=8,
            decode_memory_mb=budget / 2**20,
            val_fraction=0,
        )
    )
    assert res.rows == 8 and 0 < res.decode_peak_bytes <= budget


def test_decode_budget_admits_an_oversized_request_alone():
    budget = DecodeBudget(100)
    inside, peak, lock = [0], [0], threading.Lock()

    def job(n):
        with budget.hold(n):
            with lock:
                inside[0] += n
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= n

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(job, [30, 30, 30, 250, 30, 30, 60, 40]))
    assert peak[0] == 250  # the big one ran alone; the rest never above 100 together
    assert budget.peak == 250 and budget.in_use == 0


@needs_shared
def test_real_public_folder_through_a_symlink_gives_the_same_manifest(tmp_path):
    real = SHARED / "kermany_fullres_subset"
    if not real.is_dir():
        pytest.skip(f"{real} not found (see ../shared/data/README.md)")
    link = tmp_path / "data_link"
    link.symlink_to(real, target_is_directory=True)
    a = ingest(IngestConfig(source=str(real), out=str(tmp_path / "a.csv")))
    b = ingest(IngestConfig(source=str(link), out=str(tmp_path / "b.csv")))
    assert a.rows == b.rows == 100 and not b.quarantined
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    df, _ = read_manifest(tmp_path / "b.csv")
    assert df.groupby("label_name").size().to_dict() == {"normal": 50, "pneumonia": 50}
    assert b.layout.startswith("class") and b.patient_rules == {"kermany": 100}
