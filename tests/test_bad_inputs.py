"""A corpus of malformed inputs, each generated here: every one gets a clear message naming the
file and the problem, none crashes the batch, none is silently mis-read, and the good files'
manifest rows are the same with or without the bad ones beside them."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from cxr_factory import chest_like, make_dicom, make_png
from PIL import Image

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.stage import ingest
from transforms.io import CXRReadError, read_header, read_image
from transforms.manifest import ManifestError, read_manifest


def _dicom_variant(path: Path, mutate) -> Path:
    make_dicom(path, chest_like(48, 48, np.uint16, seed=3))
    ds = pydicom.dcmread(path)
    mutate(ds)
    ds.save_as(path)
    return path


def _bad_files(d: Path) -> dict[str, str]:
    """name -> a fragment the reason must contain."""
    d.mkdir(parents=True, exist_ok=True)
    t = make_dicom(d / "truncated.dcm", chest_like(64, 64, np.uint16))
    t.write_bytes(t.read_bytes()[:1500])
    (d / "zero.png").write_bytes(b"")
    (d / "zero.dcm").write_bytes(b"")
    (d / "text.png").write_text("not an image at all\n")
    (d / "html.jpg").write_text("<html>404</html>")
    make_dicom(d / "nopixels.dcm", None)
    make_dicom(d / "multiframe.dcm", chest_like(32, 32, np.uint8), frames=3)
    make_png(d / "tiny.png", chest_like(10, 10, np.uint8))
    make_png(d / "constant.png", np.full((40, 40), 7, np.uint8))

    def wrong_vr(ds):
        del ds.Rows
        ds.add_new(0x00280010, "LO", "forty-eight")  # Rows as text

    _dicom_variant(d / "wrong_vr.dcm", wrong_vr)
    _dicom_variant(d / "no_rows.dcm", lambda ds: delattr(ds, "Rows"))

    def short(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]

    _dicom_variant(d / "short_pixels.dcm", short)

    def huge(ds):
        ds.Rows, ds.Columns = 60000, 60000

    _dicom_variant(d / "huge.dcm", huge)

    def bits(ds):
        ds.BitsStored, ds.HighBit = 20, 19

    _dicom_variant(d / "bits.dcm", bits)

    def unsupported(ds):
        # a transfer syntax no installed plugin decodes (MPEG-2 video), with encapsulated data
        from pydicom.encaps import encapsulate
        from pydicom.uid import MPEG2MPML

        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.PixelData = encapsulate([b"\xff\x0a" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    _dicom_variant(d / "unsupported_ts.dcm", unsupported)
    arr = chest_like(32, 32, np.uint16).astype(np.float32)
    arr[5, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), d / "nan.nii.gz")
    os.symlink(d / "loop_b.png", d / "loop_a.png")
    os.symlink(d / "loop_a.png", d / "loop_b.png")
    os.symlink(d / "gone.png", d / "dangling.png")
    return {
        "truncated.dcm": "",
        "zero.png": "empty file",
        "zero.dcm": "empty file",
        "text.png": "not a PNG",
        "html.jpg": "",
        "nopixels.dcm": "Pixel Data",
        "multiframe.dcm": "multi-frame",
        "tiny.png": "smaller than",
        "constant.png": "constant",
        "wrong_vr.dcm": "",
        "no_rows.dcm": "Rows",
        "short_pixels.dcm": "",
        "huge.dcm": "",
        "bits.dcm": "BitsStored",
        "unsupported_ts.dcm": "",
        "nan.nii.gz": "NaN",
        "loop_a.png": "symlink",
        "loop_b.png": "symlink",
        "dangling.png": "symlink",
    }


def _good_files(d: Path) -> None:
    (d / "pneumonia").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        make_png(d / "normal" / f"g{i}.png", chest_like(48, 40, np.uint8, seed=i))
        make_dicom(d / "pneumonia" / f"d{i}.dcm", chest_like(40, 48, np.uint16, seed=10 + i))


def test_folder_with_bad_files_quarantines_each_and_keeps_good_rows_identical(tmp_path):
    clean, mixed = tmp_path / "clean", tmp_path / "mixed"
    _good_files(clean)
    _good_files(mixed)
    expected = _bad_files(mixed / "normal")
    a = ingest(IngestConfig(source=str(clean), out=str(tmp_path / "m" / "clean.csv"), val_fraction=0.0))
    # most files here are bad on purpose: allow it (by default more than half quarantined fails)
    b = ingest(
        IngestConfig(
            source=str(mixed), out=str(tmp_path / "m" / "mixed.csv"), val_fraction=0.0, max_quarantined=1.0
        )
    )
    da, _ = read_manifest(a.manifest)
    db, _ = read_manifest(b.manifest)
    cols = ["path", "label", "label_name", "split", "height", "width", "pixel_hash"]
    pd.testing.assert_frame_equal(
        da[cols].sort_values("path").reset_index(drop=True),
        db[cols].sort_values("path").reset_index(drop=True),
    )
    q = pd.read_csv(Path(b.manifest).with_suffix(".quarantine.csv"))
    reasons = {Path(f).name: r for f, r in zip(q["file"], q["reason"], strict=True)}
    assert set(reasons) == set(expected), set(expected) ^ set(reasons)
    for name, fragment in expected.items():
        assert fragment.lower() in reasons[name].lower(), (name, reasons[name])
        assert "\n" not in reasons[name] and len(reasons[name]) > 10
    assert len(expected) >= 19


@pytest.mark.parametrize(
    "name",
    [
        "truncated.dcm",
        "wrong_vr.dcm",
        "no_rows.dcm",
        "short_pixels.dcm",
        "huge.dcm",
        "unsupported_ts.dcm",
        "nan.nii.gz",
    ],
)
def test_reader_error_names_the_file(tmp_path, name):
    _bad_files(tmp_path / "b")
    with pytest.raises(CXRReadError) as e:
        read_image(tmp_path / "b" / name)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_manifest_csv_problems_are_reported_row_by_row(tmp_path):
    root = tmp_path / "data"
    _good_files(root)
    outside = tmp_path / "elsewhere.png"
    make_png(outside, chest_like(48, 48, np.uint8, seed=50))
    rows = [
        ("normal/g0.png", "normal"),
        ("normal/g1.png", "normal"),
        ("normal/g1.png", "normal"),  # duplicated row
        ("pneumonia/d0.dcm", "pneumonia"),
        ("pneumonia/d1.dcm", ""),  # missing label
        ("pneumonia/d2.dcm", "pneumonia!?"),  # unknown / unreadable label
        ("../elsewhere.png", "normal"),  # outside the data root
        ("normal/does_not_exist.png", "normal"),  # no such file
        ("normal/g2.png", "normal"),
    ]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "list.csv", index=False)
    res = ingest(
        IngestConfig(
            source=str(root / "list.csv"),
            out=str(tmp_path / "m" / "list.csv"),
            val_fraction=0.0,
            max_quarantined=1.0,
        )
    )
    df, _ = read_manifest(res.manifest)
    assert sorted(df["path"]) == ["normal/g0.png", "normal/g1.png", "normal/g2.png", "pneumonia/d0.dcm"]
    q = pd.read_csv(Path(res.manifest).with_suffix(".quarantine.csv"))
    why = " | ".join(q["reason"])
    assert len(q) == 5
    for fragment in ("duplicate row", "empty", "unreadable label", "outside the data root", "does not exist"):
        assert fragment in why, fragment


def test_empty_folder_and_wrong_out_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        ingest(IngestConfig(source=str(tmp_path / "empty"), out=str(tmp_path / "o.csv")))
    _good_files(tmp_path / "g")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        ingest(IngestConfig(source=str(tmp_path / "g"), out=str(tmp_path / "afile" / "m.csv")))
    with pytest.raises(ValueError, match="must be a .csv"):
        ingest(IngestConfig(source=str(tmp_path / "g"), out=str(tmp_path / "m.txt")))


def test_a_manifest_cannot_escape_its_data_root(tmp_path):
    root = tmp_path / "root"
    _good_files(root)
    res = ingest(IngestConfig(source=str(root), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    df = pd.read_csv(res.manifest)
    df.loc[0, "path"] = "../../etc/passwd"
    df.to_csv(res.manifest, index=False)
    with pytest.raises(ManifestError, match="escapes the data root"):
        read_manifest(res.manifest)


# ------------------------------------------------------------------ bombs: huge by header, small on disk
BOMB = 20000  # 400 megapixels declared; a few hundred bytes on disk


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid small PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed)."""
    buf = io.BytesIO()
    Image.fromarray(chest_like(16, 16, np.uint8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"IHDR"
    struct.pack_into(">II", b, 16, width, height)
    struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))
    return path


def jpeg_declaring(path: Path, width: int, height: int) -> Path:
    """A small baseline JPEG whose SOF0 frame header is patched to declare ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(chest_like(16, 16, np.uint8)).save(buf, "JPEG")
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")
    struct.pack_into(">HH", b, sof + 5, height, width)
    path.write_bytes(bytes(b))
    return path


def nifti_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI-1 header declaring ``shape`` (uint8) followed by only 64 bytes of data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_offset(352)
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    return path


def test_bomb_builders_declare_what_they_say(tmp_path, monkeypatch):
    # the header parsers of Pillow and nibabel themselves, not ours, read the declared size
    # (Pillow's own bomb check is lifted here only to read it: opening is lazy, nothing is decoded)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(png_declaring(tmp_path / "a.png", BOMB, BOMB + 1)) as im:
        assert im.size == (BOMB, BOMB + 1)
    with Image.open(jpeg_declaring(tmp_path / "a.jpg", BOMB, BOMB + 1)) as im:
        assert im.size == (BOMB, BOMB + 1)
    assert nib.load(nifti_declaring(tmp_path / "a.nii", (BOMB, BOMB + 1))).shape == (BOMB, BOMB + 1)


@pytest.mark.parametrize(
    "name,build",
    [
        ("bomb.png", lambda p: png_declaring(p, BOMB, BOMB)),
        ("bomb.jpg", lambda p: jpeg_declaring(p, BOMB, BOMB)),
        ("bomb.nii", lambda p: nifti_declaring(p, (BOMB, BOMB))),
    ],
)
def test_every_reader_refuses_a_huge_image_from_its_header(tmp_path, name, build):
    path = build(tmp_path / name)
    assert path.stat().st_size < 2000
    info = read_header(path)
    assert (info.height, info.width) == (BOMB, BOMB)
    with pytest.raises(CXRReadError, match=f"{BOMB}x{BOMB} px .* over the 144 megapixel cap") as e:
        read_image(path)
    assert name in str(e.value)


def test_pixel_cap_is_one_setting_for_every_reader(tmp_path):
    png = make_png(tmp_path / "a.png", chest_like(40, 50, np.uint8))
    dcm = make_dicom(tmp_path / "a.dcm", chest_like(40, 50, np.uint16))
    nii = tmp_path / "a.nii"
    nib.save(nib.Nifti1Image(chest_like(40, 50, np.uint16).T.copy(), np.eye(4)), nii)
    for p in (png, dcm, nii):
        assert read_image(p, max_pixels=2000)[0].shape == (40, 50)
        with pytest.raises(CXRReadError, match="40x50 px"):
            read_image(p, max_pixels=1999)


def test_bombs_in_a_folder_are_quarantined_with_their_size(tmp_path):
    src = tmp_path / "src"
    _good_files(src)
    png_declaring(src / "normal" / "bomb.png", BOMB, BOMB)
    jpeg_declaring(src / "normal" / "bomb.jpg", 13000, 13000)
    nifti_declaring(src / "pneumonia" / "bomb.nii", (BOMB, BOMB))
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert res.rows == 6
    q = pd.read_csv(tmp_path / "m.quarantine.csv")
    reasons = {Path(f).name: r for f, r in zip(q["file"], q["reason"], strict=True)}
    assert set(reasons) == {"bomb.png", "bomb.jpg", "bomb.nii"}
    assert f"{BOMB}x{BOMB} px" in reasons["bomb.png"] and "13000x13000 px" in reasons["bomb.jpg"]
    assert f"{BOMB}x{BOMB} px" in reasons["bomb.nii"] and all("cap" in r for r in reasons.values())


def test_three_slice_nifti_is_refused_not_averaged(tmp_path):
    vol = np.stack([chest_like(40, 40, np.uint16, seed=s) for s in range(3)], axis=-1)  # (x, y, 3 slices)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(CXRReadError, match="3-D"):
        read_image(tmp_path / "vol.nii.gz")


def test_a_non_utf8_file_name_is_quarantined_and_the_rest_ingests(tmp_path):
    src = tmp_path / "src"
    _good_files(src)
    buf = io.BytesIO()
    Image.fromarray(chest_like(40, 40, np.uint8, seed=77)).save(buf, "PNG")
    bad = os.path.join(os.fsencode(src / "normal"), b"caf\xe9.png")  # Latin-1 names
    with open(bad, "wb") as f:
        f.write(buf.getvalue())
    bad_class = os.path.join(os.fsencode(src), b"\xe9t\xe9")  # a class folder
    os.mkdir(bad_class)
    with open(os.path.join(bad_class, b"x.png"), "wb") as f:
        f.write(buf.getvalue())
    res = ingest(IngestConfig(source=str(src), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert res.rows == 6
    q = pd.read_csv(tmp_path / "m.quarantine.csv", encoding="utf-8")
    assert sorted(q["file"].str.rsplit("/", n=2).str[-2:].str.join("/")) == [
        "\\xe9t\\xe9/x.png",
        "normal/caf\\xe9.png",
    ]
    assert all("not valid UTF-8" in r for r in q["reason"])
    assert "caf" not in (tmp_path / "m.csv").read_text()
    assert set(read_manifest(tmp_path / "m.csv")[0]["label_name"]) == {"normal", "pneumonia"}


def test_a_file_whose_name_starts_with_two_dots_is_inside_the_root(tmp_path):
    """'..scan.png' lies inside the root: only a path part that is exactly '..' escapes."""
    root = tmp_path / "data"
    _good_files(root)
    make_png(root / "..scan.png", chest_like(48, 48, np.uint8, seed=60))
    rows = [("..scan.png", "normal"), ("normal/g0.png", "normal"), ("pneumonia/d0.dcm", "pneumonia")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "list.csv", index=False)
    res = ingest(IngestConfig(source=str(root / "list.csv"), out=str(tmp_path / "m.csv"), val_fraction=0.0))
    assert not res.quarantined
    df, data_root = read_manifest(res.manifest)
    assert sorted(df["path"]) == ["..scan.png", "normal/g0.png", "pneumonia/d0.dcm"]
    assert all(Path(p).is_file() for p in df["abs_path"])
