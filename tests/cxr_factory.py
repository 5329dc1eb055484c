"""Builders for real test files: DICOM (via pydicom), PNG/JPEG (Pillow), NIfTI (nibabel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.infra.config import load_config
from pipeline.infra.stage_configs import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage

# the classifier of a gain study small enough for the suite: the gain tests' common settings
TINY_GAIN_CLASSIFY = [
    "classify.data.image_size=32",
    "classify.data.batch_size=16",
    "classify.model.widths=[8,16,16,16]",
    "classify.epochs=1",
    "classify.bootstrap=20",
    "classify.threads=1",
]

# a VAE-GAN small enough to train an epoch in a second or two: the train tests' common settings
TINY_TRAIN = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.max_train=24",
    "data.max_val=8",
    "model.latent_dim=8",
    "model.base_channels=8",
    "model.max_channels=32",
    "model.disc_channels=8",
    "grid_size=8",
    "threads=1",
    "tracking.log_every=1",
]


def tiny_train_config(manifest, tmp_path: Path, *extra: str):
    """A TrainConfig of TINY_TRAIN for one epoch, writing under tmp_path; ``extra`` overrides last."""
    return load_config(
        TrainConfig,
        None,
        [
            f"data.manifest={manifest}",
            *TINY_TRAIN,
            "epochs=1",
            f"out_dir={tmp_path / 'out'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.log_model=false",
            *extra,
        ],
    )


def chest_like(h: int = 96, w: int = 80, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """A non-symmetric test image with a bright marker in the top-left corner (orientation check)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    top = np.iinfo(dtype).max if dtype != np.float32 else 1.0
    img = (0.3 + 0.4 * (yy / h) + 0.1 * np.sin(xx / 5.0)) * top * 0.8
    img += rng.normal(0, 0.02 * top, (h, w))
    img[: h // 8, : w // 8] = top  # marker: top-left
    img[-h // 10 :, w // 2 :] = 0  # dark block: bottom-right
    return np.clip(img, 0, top).astype(dtype)


def make_dicom(
    path: str | Path,
    arr: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    patient_id: str = "TEST-PATIENT",
    patient_name: str = "Test^Patient",
    compress: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a CR DICOM file; ``arr=None`` leaves out Pixel Data; ``compress`` an UID name."""
    import pydicom.uid as U
    from pydicom.dataset import FileDataset, FileMetaDataset

    path = Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = U.generate_uid()
    meta.TransferSyntaxUID = U.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = U.generate_uid()
    ds.SeriesInstanceUID = U.generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20200102"
    shape = (16, 16) if arr is None else arr.shape
    ds.Rows, ds.Columns = int(shape[-2]), int(shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    itemsize = 1 if arr is None else arr.dtype.itemsize
    ds.BitsAllocated = 8 * itemsize
    ds.BitsStored = bits_stored or 8 * itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    if arr is not None:
        data = np.ascontiguousarray(arr)
        if frames > 1 and data.ndim == 2:
            data = np.stack([data] * frames)
        ds.PixelData = data.tobytes()
        if compress:
            ds.compress(getattr(U, compress))
    ds.save_as(path, enforce_file_format=True)
    return path


def make_png(path: str | Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == np.uint16:
        Image.fromarray(arr).save(path)  # mode I;16: a 16-bit greyscale PNG
    else:
        Image.fromarray(arr).save(path)
    return path


def _needs_shared():
    import pytest

    return pytest.mark.skipif(
        not SHARED.is_dir(), reason=f"real chest X-ray data not found at {SHARED} (see the project README)"
    )


needs_shared = _needs_shared()
