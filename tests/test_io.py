from __future__ import annotations

import numpy as np
import pytest
import torch
from cxr_factory import SHARED, chest_like, make_dicom, make_png, needs_shared

from transforms import CXRReadError, TransformConfig, eval_transforms, read_image

DICOM_DIR = SHARED / "dicom_cxr"


def _load(path, size=64):
    return eval_transforms(TransformConfig(image_size=size))({"image": str(path), "label": 0})["image"]


# ---------------------------------------------------------------- real DICOM files (../shared/data)
@needs_shared
@pytest.mark.parametrize(
    "name,inverted",
    [
        ("nema_wg04_RG1_UNCR.dcm", False),
        ("nema_wg04_RG1_J2KI.dcm", False),
        ("rsna_pneumonia_CR_jpegbaseline.dcm", False),
        # pixels of a MONOCHROME2 image under a MONOCHROME1 header: honouring the header inverts it
        ("rsna_pneumonia_CR_jpegbaseline_fakeMONOCHROME1.dcm", True),
    ],
)
def test_real_dicom_loads_upright_in_range(name, inverted):
    import pydicom

    path = DICOM_DIR / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    arr, info = read_image(path)
    # (rows, columns) as the header says: not transposed (RG1 is 1955 x 1841, non-square)
    assert arr.shape == (int(ds.Rows), int(ds.Columns))
    t = _load(path)
    assert t.shape == (1, 64, 64) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert float(t.max()) - float(t.min()) > 1.5  # uses the range, not a flat image
    # upright PA chest: the lung fields (upper-middle band, left and right of the spine) are darker
    # than the mediastinum/spine column between them
    img = t[0].numpy()
    lungs = np.concatenate([img[18:40, 12:24].ravel(), img[18:40, 40:52].ravel()]).mean()
    spine = img[18:40, 29:35].mean()
    assert (lungs < spine) != inverted, (
        f"{name}: lungs {lungs:.2f} vs spine {spine:.2f}: wrong polarity or rotated"
    )


@needs_shared
def test_fake_monochrome1_is_the_inversion_of_its_twin():
    a = _load(DICOM_DIR / "rsna_pneumonia_CR_jpegbaseline.dcm", 128).flatten().numpy()
    b = _load(DICOM_DIR / "rsna_pneumonia_CR_jpegbaseline_fakeMONOCHROME1.dcm", 128).flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] < -0.99


@needs_shared
def test_jpeg2000_matches_uncompressed_original():
    a = _load(DICOM_DIR / "nema_wg04_RG1_UNCR.dcm").flatten().numpy()
    b = _load(DICOM_DIR / "nema_wg04_RG1_J2KI.dcm").flatten().numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.98
    _, info = read_image(DICOM_DIR / "nema_wg04_RG1_J2KI.dcm")
    assert "2000" in info.transfer_syntax and info.photometric == "MONOCHROME1" and info.bits_stored == 15


# ---------------------------------------------------------------- generated files
def test_png_and_dicom_with_same_pixels_load_to_same_tensor(tmp_path):
    arr = chest_like(96, 80, np.uint16)
    png = make_png(tmp_path / "a.png", arr)
    dcm = make_dicom(tmp_path / "a.dcm", arr)
    tp, td = _load(png), _load(dcm)
    assert torch.allclose(tp, td, atol=1e-6)
    # orientation: the top-left marker is bright, the bottom-right block dark
    raw, _ = read_image(png)
    assert raw[0, 0] == arr.max() and raw[-1, -1] == 0


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_compressed_dicom_equals_uncompressed(tmp_path, syntax):
    arr = chest_like(64, 64, np.uint16)
    plain = make_dicom(tmp_path / "plain.dcm", arr)
    comp = make_dicom(tmp_path / "comp.dcm", arr, compress=syntax)
    a, _ = read_image(plain)
    b, info = read_image(comp)
    assert info.transfer_syntax != "Explicit VR Little Endian"
    np.testing.assert_array_equal(a, b)


def test_monochrome1_generated_is_inverted(tmp_path):
    arr = chest_like(64, 64, np.uint8)
    m2 = _load(make_dicom(tmp_path / "m2.dcm", arr, photometric="MONOCHROME2"))
    m1 = _load(make_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    assert torch.allclose(m1, -m2, atol=1e-5)


def test_modality_lut_and_window_are_applied(tmp_path):
    arr = chest_like(64, 64, np.uint16)
    base, _ = read_image(make_dicom(tmp_path / "a.dcm", arr))
    scaled, _ = read_image(
        make_dicom(tmp_path / "b.dcm", arr, extra={"RescaleSlope": 2, "RescaleIntercept": -100})
    )
    np.testing.assert_allclose(scaled, base * 2 - 100)
    win, _ = read_image(
        make_dicom(tmp_path / "c.dcm", arr, extra={"WindowCenter": 30000, "WindowWidth": 10000})
    )
    assert win.max() > win.min()
    assert (win == win.min()).mean() > (base == base.min()).mean()  # the window clipped the dark end


def test_sixteen_and_eight_bit_png_and_jpeg(tmp_path):
    a16 = chest_like(64, 64, np.uint16)
    a8 = (a16 >> 8).astype(np.uint8)
    r16, i16 = read_image(make_png(tmp_path / "a16.png", a16))
    r8, i8 = read_image(make_png(tmp_path / "a8.png", a8))
    assert i16.bits_stored == 16 and i8.bits_stored == 8
    assert r16.max() > 255 and r8.max() <= 255
    from PIL import Image

    Image.fromarray(a8).save(tmp_path / "a.jpg", quality=95)
    rj, ij = read_image(tmp_path / "a.jpg")
    assert ij.format == "jpeg" and np.abs(rj - a8).mean() < 4


def test_rgb_and_rgba_collapse_to_grey(tmp_path):
    from PIL import Image

    g = chest_like(64, 64, np.uint8)
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])).save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        arr, info = read_image(tmp_path / name)
        assert arr.ndim == 2 and info.photometric == "RGB"
        np.testing.assert_allclose(arr, g, atol=1)


def test_nifti_2d_reads_upright(tmp_path):
    import nibabel as nib

    arr = chest_like(96, 80, np.uint16)
    # MONAI/ITK convention: axis 0 of the NIfTI array is the column
    nib.save(nib.Nifti1Image(arr.T.copy(), np.eye(4)), tmp_path / "a.nii.gz")
    out, info = read_image(tmp_path / "a.nii.gz")
    assert info.format == "nifti"
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_multiframe_dicom_rejected(tmp_path):
    p = make_dicom(tmp_path / "mf.dcm", chest_like(32, 32, np.uint8), frames=3)
    with pytest.raises(CXRReadError, match="multi-frame"):
        read_image(p)


def test_dicom_without_pixel_data_rejected(tmp_path):
    p = make_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(CXRReadError, match="Pixel Data"):
        read_image(p)


def test_truncated_dicom_rejected(tmp_path):
    p = make_dicom(tmp_path / "t.dcm", chest_like(64, 64, np.uint16))
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(CXRReadError) as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_zero_byte_and_text_png_rejected(tmp_path):
    z = tmp_path / "zero.png"
    z.write_bytes(b"")
    with pytest.raises(CXRReadError, match="empty file"):
        read_image(z)
    t = tmp_path / "text.png"
    t.write_text("this is not an image\n")
    with pytest.raises(CXRReadError, match="not a PNG"):
        read_image(t)


def test_nan_float_image_rejected(tmp_path):
    import nibabel as nib

    arr = chest_like(32, 32, np.float32)
    arr[3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr.T.copy(), np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(CXRReadError, match="NaN"):
        read_image(tmp_path / "nan.nii")


def test_bits_stored_above_allocated_rejected(tmp_path):
    p = make_dicom(tmp_path / "b.dcm", chest_like(32, 32, np.uint8), bits_stored=8)
    import pydicom

    ds = pydicom.dcmread(p)
    ds.BitsStored = 12
    ds.save_as(p)
    with pytest.raises(CXRReadError, match="BitsStored"):
        read_image(p)


def test_nifti_colour_in_the_nifti_vector_layout_reads_as_grey(tmp_path):
    import nibabel as nib

    g = chest_like(40, 36, np.uint8)
    rgb = np.stack([g, g, g], -1)  # (H, W, 3)
    vec = rgb.transpose(1, 0, 2)[:, :, None, None, :]  # NIfTI: (x, y, z=1, t=1, c=3)
    nib.save(nib.Nifti1Image(vec.copy(), np.eye(4)), tmp_path / "rgb.nii.gz")
    arr, info = read_image(tmp_path / "rgb.nii.gz")
    assert arr.shape == (40, 36) and info.format == "nifti"
    np.testing.assert_allclose(arr, g, atol=1e-3)
