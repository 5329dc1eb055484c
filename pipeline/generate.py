"""``python -m pipeline.run generate checkpoint=<path|MLflow model URI> n=N label=<name|balanced> out=DIR``.

Writes labelled synthetic radiographs as PNG (and, with ``dicom=true``, DICOM Secondary Capture
objects marked derived/synthetic, carrying no patient data from anywhere) plus a manifest of the
generated set that the rest of the pipeline reads like any other: label, seed, index, source
checkpoint and its SHA-256. The same seed gives the same images: all latent codes are drawn from
one CPU generator seeded once, so image ``i`` does not depend on the batch size or the device.

All or nothing: the set is written into a hidden sibling folder (``.OUT.generating-*``) and renamed
into place only once every image, the manifest and the preview are complete, so ``OUT`` holds a
whole set or nothing new. Too little free space for the set is refused before anything is written;
a disk that fills anyway (``ENOSPC``/``EDQUOT``) is reported as ``disk full at PATH``, the staging
folder is removed and ``OUT`` keeps what it held before. The DICOM objects of one call form one
study and one series.

Memory does not grow with ``n``: codes are drawn, decoded and written :data:`CHUNK_IMAGES` images
at a time (in chunks that keep the images identical to one draw of all of them). One call at a
time per ``OUT``: the call holds a lock (``.OUT.lock`` beside it, removed at the end) from its
first check of ``OUT`` to its MLflow run, so a second call is refused at once, naming the holder.
File names hold a file-safe form of the class name (:func:`file_safe`); the manifest and the DICOM
text keep the real one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.infra import runtime, tracking
from pipeline.infra.config import flatten, to_dict
from pipeline.infra.engine import check_writable, pick_device
from pipeline.infra.loaders import (
    LoadedGenerator,
    load_generator,
    load_images,
    prior_used,
    resolve_labels,
)
from pipeline.infra.locks import RunLock, swap_into_place
from pipeline.infra.outbox import OUTBOX_NAME
from pipeline.infra.quality import nn_distances
from pipeline.infra.stage_configs import (
    GenerateConfig,
)
from pipeline.infra.tracking import resolve_uri
from pipeline.infra.viz import save_grid
from transforms.io import pixel_hash
from transforms.manifest import COLUMNS, atomic_write_text, sidecar_path, write_manifest

SYNTHETIC_COLUMNS = ("synthetic", "seed", "index", "source", "source_sha256")
# DICOM value representations holding text in the character set of SpecificCharacterSet
TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})


# images drawn, decoded and written at a time (rounded up to a multiple of 16 and of batch_size):
# what generate holds in memory whatever n
CHUNK_IMAGES = 1024
MAX_REDRAW_ROUNDS = 20


def _chunk_rows(batch_size: int) -> int:
    """Images per chunk: about :data:`CHUNK_IMAGES`, a multiple of 16 (so that torch draws each
    chunk's codes as the same stretch of one seeded stream as a single draw of all codes would)
    and of ``batch_size`` (so that the decoder sees the same batches as in one draw)."""
    step = math.lcm(16, max(1, int(batch_size)))
    return step * max(1, -(-CHUNK_IMAGES // step))


def sample_chunks(
    loaded: LoadedGenerator, labels: np.ndarray, seed: int, batch_size: int = 256, prior: str = "fitted"
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, images)``: ``loaders.sample_images(loaded, labels, seed, batch_size, prior)[start:
    start + len(images)]``, one chunk at a time, so that only a chunk is ever held.

    The codes come from one CPU generator seeded once, as in ``Generator.sample``: torch's normal
    sampler draws a tensor in blocks of 16 values (recomputing the last 16 of a size that is not a
    multiple of 16), so chunks of a multiple of 16 values, and a last chunk of at least 16, take
    the very values of one big draw. A short tail therefore joins the chunk before it."""
    gen = loaded.generator
    n, rows = len(labels), _chunk_rows(batch_size)
    rng = torch.Generator().manual_seed(seed)
    lab = None if loaded.num_classes == 0 else torch.as_tensor(labels, dtype=torch.long)
    dev = next(gen.decoder.parameters()).device
    start = 0
    while start < n:
        m = n - start if n - start < 2 * rows else rows
        eps = torch.randn(m, gen.decoder.latent_dim, generator=rng)
        out = []
        with torch.no_grad():
            for i in range(0, m, batch_size):
                e = eps[i : i + batch_size].to(dev)
                y = None if lab is None else lab[start + i : start + i + batch_size].to(dev)
                z = gen.prior(e, y) if prior == "fitted" else e
                out.append(gen.decoder(z, y).float().cpu())
        yield start, torch.cat(out)
        start += m


class _NearCopies:
    """``quality.memorisation_audit``'s rule, its threshold computed once for all chunks: an image
    closer to a training image than ``near_copy_percentile`` % of the real test images are to
    theirs (pixel L2) is a near-copy."""

    def __init__(self, cfg: GenerateConfig, image_size: int) -> None:
        self.train, _ = load_images(cfg.drop_near_copies, "train", image_size)
        test, _ = load_images(cfg.drop_near_copies, "test", image_size)
        self.threshold = float(np.percentile(nn_distances(test, self.train)[0], cfg.near_copy_percentile))

    def flags(self, images: torch.Tensor) -> np.ndarray:
        return nn_distances(images, self.train)[0] < self.threshold


def file_safe(name: str, limit: int = 64) -> str:
    """``name`` (a class name) as part of a file name: anything but letters, digits, ``.``, ``-``
    and ``_`` (``/``, ``\\``, ``:``, spaces, control characters) becomes ``_``; at most ``limit``
    characters. Two names may map to one: the image index keeps the file names apart."""
    return re.sub(r"[^\w.-]", "_", name)[:limit] or "_"


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return ((img.clamp(-1, 1)[0].numpy() + 1) * 127.5).round().astype(np.uint8)


def write_dicom(
    path: Path, pixels: np.ndarray, label_name: str, series_uid: str, index: int, study_uid: str | None = None
) -> None:
    """A Secondary Capture object marked synthetic: no patient data is copied from anywhere.

    ``study_uid``: the study the object belongs to (``generate`` gives one per call); a new one
    when omitted."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.ConversionType = "SYN"  # DICOM's defined term for a synthetic image
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = (
        "Synthetic chest radiograph generated by cxr-vaegan (VAE-GAN); not a patient image"
    )
    ds.BurnedInAnnotation = "NO"
    ds.SeriesDescription = f"SYNTHETIC cxr-vaegan {label_name}"[:64]
    ds.ImageComments = f"synthetic; label={label_name}"
    ds.InstanceNumber = index + 1
    # type-2 patient/study attributes present but empty: nothing identifying, nothing copied
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.Manufacturer = "cxr-vaegan"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if any(e.VR in TEXT_VRS and not str(e.value).isascii() for e in ds):
        # a class name beyond ASCII: declare UTF-8, else readers decode its bytes as ASCII/Latin-1
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.save_as(str(path), enforce_file_format=True)


class OutputSpaceError(PermissionError):
    """Too little free space for the generated set, or the disk filled while writing it.

    A ``PermissionError`` like ``engine.check_writable``'s "output folder is full", so that
    ``pipeline.run`` reports it in one line instead of a traceback."""


class OutputExistsError(FileExistsError, ValueError):
    """``out`` is not empty and ``overwrite`` is not set (a ``ValueError`` for ``pipeline.run``)."""


def estimate_bytes(n: int, image_size: int, dicom: bool, source: str = "") -> int:
    """Upper estimate of what ``generate`` writes: PNG <= S*S + 1 KiB each (8-bit grey, worst case
    uncompressed), DICOM S*S + 2 KiB each, the manifest (+ sidecar) and the preview grid, and once
    more the manifest and preview for a tracking outbox that copies them when the server is down."""
    s = int(image_size)
    png = n * (s * s + 1024)
    dcm = n * (s * s + 2048) if dicom else 0
    manifest = n * (400 + 2 * len(source)) + 4096
    m = min(n, 64)
    cols, rows = min(8, m), -(-m // 8)
    up = max(1, 128 // s)
    preview = (rows * (s + 2) + 2) * up * ((cols * (s + 2) + 2) * up + 1) + 1024
    return png + dcm + 2 * (manifest + preview) + 64 * 1024


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` (unless ``overwrite``) and an unsent tracking outbox in it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file, not a folder")
    real = out.resolve()
    if real == real.parent or Path.cwd().resolve().is_relative_to(real):
        raise ValueError(f"out={out} is the current folder, one above it or a root: give a folder of its own")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"output folder {out} is not empty: a new set beside its files would mix two sets. "
            f"Give another out=, or overwrite=true to replace its contents"
        )

    ops = out / OUTBOX_NAME / "ops.jsonl"
    if ops.is_file() and ops.read_text().strip():
        raise OutputExistsError(
            f"{ops.parent} holds MLflow calls of the earlier run in {out} not yet sent; overwrite=true "
            f"would discard them. Send them first: python -m pipeline.run sync {ops.parent} "
            f"(or delete that folder), or give another out="
        )


def _check_free_space(out: Path, need: int) -> None:
    where = _existing_ancestor(out.resolve().parent)
    free = shutil.disk_usage(where).free
    if free < need:
        raise OutputSpaceError(
            f"not enough free space for out={out}: this call needs about {need:,} bytes "
            f"({need / 2**20:.1f} MiB) and {where} has {free:,} bytes free "
            f"({free / 2**20:.1f} MiB); free some space, lower n or give another out="
        )


def _make_staging(out: Path) -> Path:
    """A new hidden sibling of ``out`` (``mkdir``, so it gets the umask's mode, not mkdtemp's 0700)."""
    for _ in range(100):
        staging = out.parent / f".{out.name}.generating-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free staging folder name beside {out}")


@contextlib.contextmanager
def _out_lock(out_abs: Path) -> Iterator[None]:
    """Hold ``RunLock`` on ``out`` (``.OUT.lock`` beside it) for the whole call; the file is removed
    at the end, while still held. A lock file its holder removed between our open and our flock is
    no lock any more: then it is taken again, on the new file."""
    while True:
        lock = RunLock(
            out_abs, what="output folder", fix="wait for that generate call to end, or give another out="
        )
        lock.__enter__()
        try:
            same = os.path.samestat(os.fstat(lock.fd), os.stat(lock.path))
        except FileNotFoundError:
            same = False
        if same:
            break
        lock.__exit__(None, None, None)
    try:
        yield
    finally:
        lock.path.unlink(missing_ok=True)
        lock.__exit__(None, None, None)


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write the images and their manifest; returns the manifest path, counts and MLflow run id."""
    out = Path(cfg.out)
    _check_out_folder(out, cfg.overwrite)  # a file or a root is refused before any lock is taken
    with _out_lock(out.resolve()):
        # again under the lock: a call that ended meanwhile may have filled out
        _check_out_folder(out, cfg.overwrite)
        return _generate(cfg, out)


def _generate(cfg: GenerateConfig, out: Path) -> dict[str, Any]:
    device = pick_device(cfg.device)
    loaded = load_generator(cfg.checkpoint, device, resolve_uri(cfg.tracking))
    labels = resolve_labels(cfg.label, cfg.n, loaded)
    _check_free_space(out, estimate_bytes(cfg.n, loaded.image_size, cfg.dicom, loaded.source))
    out_abs = out.resolve()
    check_writable(out_abs.parent)
    t0 = time.time()
    used = prior_used(loaded, cfg.prior)
    if used != cfg.prior:
        print(
            f"{loaded.source} carries no fitted prior (trained before it existed): codes drawn from N(0, I)"
        )
    staging = _make_staging(out_abs)
    writing = {"path": staging}  # the file being written, named if the disk fills up
    try:
        df, preview, dropped = _write_images(cfg, loaded, labels, staging, writing)
        meta = _write_manifest(cfg, loaded, df, used, staging, out_abs, writing)
        writing["path"] = staging / "preview.png"
        save_grid(preview, writing["path"], nrow=8, upscale=max(1, 128 // loaded.image_size))
        writing["path"] = out_abs
        swap_into_place(staging, out_abs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            at = writing["path"]
            final = out / at.relative_to(staging) if at.is_relative_to(staging) else out
            raise OutputSpaceError(
                f"disk full at {final} ({e.strerror}); nothing of this call was kept: {out} "
                + ("holds what it held before" if out_abs.exists() else "was not created")
            ) from e
        raise
    finally:
        if staging.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    manifest, grid = out / "generated.csv", out / "preview.png"
    counts = df["label_name"].value_counts().to_dict()
    meta["near_copies_dropped"] = dropped
    print(
        f"generated {cfg.n} images {counts} in {time.time() - t0:.1f}s -> {manifest}"
        + (f" ({dropped} near-copies of training images dropped and redrawn)" if cfg.drop_near_copies else "")
    )
    run_id = _log_run(cfg, loaded, out, meta, counts, used) if cfg.log_mlflow else None
    return {
        "manifest": str(manifest),
        "n": cfg.n,
        "counts": counts,
        "run_id": run_id,
        "preview": str(grid),
        "near_copies_dropped": dropped,
        "prior": used,
    }


class _ImageWriter:
    """Writes images of the set by index under ``staging``: one PNG each (and a DICOM with
    ``dicom=true``, all of one study and series), keeping each one's pixel hash and the first 64
    images (the preview); ``writing["path"]`` names the file being written."""

    def __init__(
        self, cfg: GenerateConfig, loaded: LoadedGenerator, labels: np.ndarray, staging: Path, writing: dict
    ) -> None:
        self.cfg, self.loaded, self.labels, self.staging, self.writing = cfg, loaded, labels, staging, writing
        self.names = {
            int(lab): loaded.label_names.get(int(lab), "unlabelled" if lab < 0 else str(int(lab)))
            for lab in np.unique(labels)
        }
        self.safe = {lab: file_safe(name) for lab, name in self.names.items()}
        (staging / "images").mkdir()
        if cfg.dicom:
            from pydicom.uid import generate_uid

            (staging / "dicom").mkdir()
            self.study_uid, self.series_uid = generate_uid(), generate_uid()
        self.hashes = np.empty(len(labels), dtype=object)
        self.preview: dict[int, torch.Tensor] = {}

    def write(self, indices: np.ndarray, images: torch.Tensor) -> None:
        from PIL import Image

        staging, writing = self.staging, self.writing
        for i, img in zip(indices.tolist(), images, strict=True):
            lab = int(self.labels[i])
            px = to_uint8(img)
            writing["path"] = staging / f"images/syn_{i:06d}_{self.safe[lab]}.png"
            Image.fromarray(px).save(writing["path"])
            if self.cfg.dicom:
                writing["path"] = staging / "dicom" / f"syn_{i:06d}_{self.safe[lab]}.dcm"
                write_dicom(writing["path"], px, self.names[lab], self.series_uid, i, self.study_uid)
            self.hashes[i] = pixel_hash(px)  # as ingest hashes a file's pixels
            if i < 64:
                self.preview[i] = img

    def preview_images(self) -> torch.Tensor:
        return torch.stack([self.preview[i] for i in sorted(self.preview)])

    def manifest_rows(self) -> pd.DataFrame:
        """The manifest rows of every image, in index order."""
        labels, loaded = self.labels, self.loaded
        index = np.arange(len(labels))
        rel = [f"images/syn_{i:06d}_{self.safe[int(lab)]}.png" for i, lab in zip(index, labels, strict=True)]
        return pd.DataFrame(
            {
                "path": rel,
                "label": labels.astype(int),
                "label_name": [self.names[int(lab)] for lab in labels],
                "patient_id": [f"synthetic-{i:06d}" for i in index],
                "split": "train",
                "format": "png",
                "height": loaded.image_size,
                "width": loaded.image_size,
                "bits_stored": 8,
                "photometric": "MONOCHROME2",
                "transfer_syntax": "",
                "pixel_hash": self.hashes,
                "synthetic": 1,
                "seed": self.cfg.seed,
                "index": index,
                "source": loaded.source,
                "source_sha256": loaded.sha256,
            },
            columns=COLUMNS + list(SYNTHETIC_COLUMNS),
        )


def _write_images(
    cfg: GenerateConfig, loaded: LoadedGenerator, labels: np.ndarray, staging: Path, writing: dict[str, Path]
) -> tuple[pd.DataFrame, torch.Tensor, int]:
    """One PNG per image (and a DICOM with ``dicom=true``) under ``staging``, drawn and written a
    chunk at a time (:func:`sample_chunks`). With ``drop_near_copies`` each chunk is audited and
    the near-copies are redrawn afterwards, round by round, as one draw of all of them would be
    (round ``r``: the codes of stream ``seed + 7919 r`` for the images still flagged, in index
    order), their files written again. Returns the manifest rows, the first 64 images (the
    preview) and how many near-copies were dropped."""
    writer = _ImageWriter(cfg, loaded, labels, staging, writing)
    audit = _NearCopies(cfg, loaded.image_size) if cfg.drop_near_copies else None
    flagged = []
    for start, images in sample_chunks(loaded, labels, cfg.seed, cfg.batch_size, cfg.prior):
        idx = np.arange(start, start + len(images))
        writer.write(idx, images)
        if audit is not None:
            flagged.append(idx[audit.flags(images)])
    bad = np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
    dropped = len(bad)
    for r in range(1, MAX_REDRAW_ROUNDS + 1):
        if not len(bad):
            break
        again = []
        for start, images in sample_chunks(
            loaded, labels[bad], cfg.seed + 7919 * r, cfg.batch_size, cfg.prior
        ):
            idx = bad[start : start + len(images)]
            writer.write(idx, images)
            again.append(idx[audit.flags(images)])
        bad = np.concatenate(again)
        dropped += len(bad)
    if len(bad):
        raise RuntimeError(
            f"{len(bad)} images still near-copies after {MAX_REDRAW_ROUNDS} redraws: the generator memorises"
        )
    return writer.manifest_rows(), writer.preview_images(), dropped


def _write_manifest(
    cfg: GenerateConfig,
    loaded,
    df: pd.DataFrame,
    used: str,
    staging: Path,
    out_abs: Path,
    writing: dict[str, Path],
) -> dict[str, Any]:
    """``generated.csv`` (the rows ``df``) and its sidecar under ``staging``; returns the metadata."""
    meta = {
        "data_root_abs": str(staging),
        "source": loaded.source,
        "source_sha256": loaded.sha256,
        "seed": cfg.seed,
        "n": cfg.n,
        "label": cfg.label,
        "prior": used,
        "label_names": loaded.label_names,
        "synthetic": True,
    }
    writing["path"] = staging / "generated.csv"
    write_manifest(writing["path"], df, meta, extra=SYNTHETIC_COLUMNS)
    # readers use the relative data root ("."); the absolute fallback is the final folder
    meta["data_root_abs"] = str(out_abs)
    writing["path"] = side_path = sidecar_path(writing["path"])
    side = dict(json.loads(side_path.read_text()), data_root_abs=str(out_abs))
    atomic_write_text(side_path, json.dumps(side, indent=2, default=str) + "\n")
    return meta


def _log_run(cfg: GenerateConfig, loaded, out: Path, meta: dict, counts: dict, used: str) -> str | None:
    """The outage-tolerant Tracker: with the server down the images are still written and the run
    waits in OUT/tracking_outbox for `pipeline.run sync`. It starts after the swap, so its outbox
    and metrics.jsonl land in the final folder beside the set they describe."""
    tags = runtime.run_tags(
        "generate",
        cfg.tracking,
        tracking.git_commit(),
        source_sha256=loaded.sha256,
        generator_run_id=loaded.run_id,  # lineage: the training run of the generator
        **{
            "mlflow.note.content": f"{cfg.n} synthetic images ({cfg.label}) from {loaded.source}, seed {cfg.seed}"
        },
    )
    with runtime.tracked_run(cfg.tracking, out, tags, run_name=cfg.tracking.run_name) as tr:
        tr.log_params({**flatten(to_dict(cfg)), "prior_used": used})
        metrics = {f"count/{k}": float(v) for k, v in counts.items()}
        tr.log_metrics({**metrics, "near_copies_dropped": float(meta["near_copies_dropped"])}, step=0)
        tr.log_artifact(out / "generated.csv", "generated")
        tr.log_artifact(out / "preview.png", "generated")
        tr.log_dict(json.loads(json.dumps(meta, default=str)), "generated/generated.json")
    run_id = tr.run_id
    print(f"MLflow run id: {run_id}" if run_id else "MLflow: not reached; the run is kept in the outbox")
    return run_id
