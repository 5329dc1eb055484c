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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from networks.vaegan import Generator
from pipeline import checkpoint as ckpt
from pipeline import model_store
from pipeline.stage_configs import GenerateConfig  # also re-exported; it lives in pipeline.stage_configs
from pipeline.tracking import TrackingConfig, resolve_uri

SYNTHETIC_COLUMNS = ("synthetic", "seed", "index", "source", "source_sha256")


@dataclass
class LoadedGenerator:
    generator: Generator
    label_names: dict[int, str]
    source: str
    sha256: str
    run_id: str = ""  # the MLflow run that trained it (lineage), "" when unknown

    @property
    def image_size(self) -> int:
        return int(self.generator.decoder.image_size)

    @property
    def num_classes(self) -> int:
        return int(self.generator.decoder.num_classes)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(module: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, shapes, bytes): the same for any file holding them."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_generator(
    source: str | Path, device: str | torch.device = "cpu", tracking_uri: str = ""
) -> LoadedGenerator:
    """A generator from a train checkpoint or an MLflow model URI, loaded as data (weights only,
    never unpickled: ``pipeline.model_store``). ``tracking_uri``: where ``models:/``/``runs:/``
    addresses are looked up (default: ``MLFLOW_TRACKING_URI``, else the embedded store)."""
    src = str(source)
    if model_store.is_model_uri(src):
        gen = model_store.load_generator_uri(src, tracking_uri or resolve_uri(TrackingConfig()))
        run_id = model_store.source_run_id(src)
        return LoadedGenerator(gen.to(device).eval(), dict(gen.label_names), src, state_sha256(gen), run_id)
    payload = ckpt.load_checkpoint(src)
    gen, _ = model_store.generator_from_checkpoint(src, payload)
    run_id = str(payload.get("mlflow_run_id") or "")
    return LoadedGenerator(gen.to(device).eval(), dict(gen.label_names), src, file_sha256(src), run_id)


def resolve_labels(spec: str, n: int, lg: LoadedGenerator) -> np.ndarray:
    """``balanced`` cycles the classes; a name or index repeats one class. -1 = unconditioned."""
    if lg.num_classes == 0:
        if spec != "balanced":
            raise ValueError(f"label={spec!r}: this generator is not class-conditioned; use label=balanced")
        return np.full(n, -1, dtype=np.int64)
    if spec == "balanced":
        return np.arange(n, dtype=np.int64) % lg.num_classes
    by_name = {v.lower(): k for k, v in lg.label_names.items()}
    if spec.lower() in by_name:
        return np.full(n, by_name[spec.lower()], dtype=np.int64)
    if spec.lstrip("-").isdigit() and 0 <= int(spec) < lg.num_classes:
        return np.full(n, int(spec), dtype=np.int64)
    known = ", ".join(sorted(lg.label_names.values())) or f"indices 0..{lg.num_classes - 1}"
    raise ValueError(f"label={spec!r} is not a class of this generator (known: {known}, or balanced)")


def sample_images(
    lg: LoadedGenerator, labels: np.ndarray, seed: int, batch_size: int = 256, prior: str = "fitted"
) -> torch.Tensor:
    """``[N, 1, S, S]`` float images in ``[-1, 1]`` on the CPU, deterministic in ``seed``; codes
    from the generator's fitted prior when it has one and ``prior == "fitted"``, else N(0, I)."""
    lab = None if lg.num_classes == 0 else torch.as_tensor(labels, dtype=torch.long)
    return lg.generator.sample(lab, n=len(labels), seed=seed, prior=prior, batch_size=batch_size)


def prior_used(lg: LoadedGenerator, prior: str) -> str:
    """What ``prior`` (a config's request) draws from with this generator: ``fitted`` or ``normal``."""
    return "fitted" if prior == "fitted" and lg.generator.prior.is_fitted else "normal"


def _drop_near_copies(
    cfg: GenerateConfig, lg: LoadedGenerator, images: torch.Tensor, labels: np.ndarray, max_rounds: int = 20
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Replace near-copies of training images by fresh draws (seeded from ``cfg.seed``)."""
    from pipeline.evaluate import load_images
    from pipeline.quality import memorisation_audit

    train_x, _ = load_images(cfg.drop_near_copies, "train", lg.image_size)
    test_x, _ = load_images(cfg.drop_near_copies, "test", lg.image_size)
    flags = memorisation_audit(images, train_x, test_x, cfg.near_copy_percentile)["near_copy"]
    dropped = int(flags.sum())
    for r in range(1, max_rounds + 1):
        if not flags.any():
            return images, labels, dropped
        bad = np.flatnonzero(flags)
        new = sample_images(lg, labels[bad], cfg.seed + 7919 * r, cfg.batch_size, cfg.prior)
        images[bad] = new
        again = memorisation_audit(new, train_x, test_x, cfg.near_copy_percentile)["near_copy"]
        flags = np.zeros_like(flags)
        flags[bad[again]] = True
        dropped += int(again.sum())
    raise RuntimeError(
        f"{int(flags.sum())} images still near-copies after {max_rounds} redraws: the generator memorises"
    )


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
    from pipeline.tracking import OUTBOX_NAME

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


def _swap_into_place(staging: Path, out: Path) -> None:
    """Move the complete set in ``staging`` to ``out``, replacing what ``out`` held."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write the images and their manifest; returns the manifest path, counts and MLflow run id."""
    from PIL import Image

    from pipeline.engine import check_writable, pick_device
    from pipeline.manifest import COLUMNS, atomic_write_text, sidecar_path, write_manifest
    from pipeline.viz import save_grid

    out = Path(cfg.out)
    _check_out_folder(out, cfg.overwrite)
    device = pick_device(cfg.device)
    lg = load_generator(cfg.checkpoint, device, resolve_uri(cfg.tracking))
    labels = resolve_labels(cfg.label, cfg.n, lg)
    _check_free_space(out, estimate_bytes(cfg.n, lg.image_size, cfg.dicom, lg.source))
    out_abs = out.resolve()
    check_writable(out_abs.parent)
    t0 = time.time()
    used = prior_used(lg, cfg.prior)
    if used != cfg.prior:
        print(f"{lg.source} carries no fitted prior (trained before it existed): codes drawn from N(0, I)")
    images = sample_images(lg, labels, cfg.seed, cfg.batch_size, cfg.prior)
    dropped = 0
    if cfg.drop_near_copies:
        images, labels, dropped = _drop_near_copies(cfg, lg, images, labels)
    staging = _make_staging(out_abs)
    writing = staging
    try:
        (staging / "images").mkdir()
        if cfg.dicom:
            from pydicom.uid import generate_uid

            (staging / "dicom").mkdir()
            study_uid, series_uid = generate_uid(), generate_uid()
        rows = []
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            name = lg.label_names.get(int(lab), "unlabelled" if lab < 0 else str(int(lab)))
            px = to_uint8(img)
            rel = f"images/syn_{i:06d}_{name}.png"
            writing = staging / rel
            Image.fromarray(px).save(writing)
            if cfg.dicom:
                writing = staging / "dicom" / f"syn_{i:06d}_{name}.dcm"
                write_dicom(writing, px, name, series_uid, i, study_uid)
            rows.append(
                {
                    "path": rel,
                    "label": int(lab),
                    "label_name": name,
                    "patient_id": f"synthetic-{i:06d}",
                    "split": "train",
                    "format": "png",
                    "height": px.shape[0],
                    "width": px.shape[1],
                    "bits_stored": 8,
                    "photometric": "MONOCHROME2",
                    "transfer_syntax": "",
                    "pixel_hash": hashlib.sha256(px.tobytes()).hexdigest()[:16],
                    "synthetic": 1,
                    "seed": cfg.seed,
                    "index": i,
                    "source": lg.source,
                    "source_sha256": lg.sha256,
                }
            )
        df = pd.DataFrame(rows, columns=COLUMNS + list(SYNTHETIC_COLUMNS))
        meta = {
            "data_root_abs": str(staging),
            "source": lg.source,
            "source_sha256": lg.sha256,
            "seed": cfg.seed,
            "n": cfg.n,
            "label": cfg.label,
            "prior": used,
            "label_names": lg.label_names,
            "synthetic": True,
        }
        writing = staging / "generated.csv"
        write_manifest(writing, df, meta, extra=SYNTHETIC_COLUMNS)
        # readers use the relative data root ("."); the absolute fallback is the final folder
        meta["data_root_abs"] = str(out_abs)
        writing = sidecar_path(writing)
        side = dict(json.loads(writing.read_text()), data_root_abs=str(out_abs))
        atomic_write_text(writing, json.dumps(side, indent=2, default=str) + "\n")
        writing = staging / "preview.png"
        save_grid(images[:64], writing, nrow=8, upscale=max(1, 128 // lg.image_size))
        writing = out_abs
        _swap_into_place(staging, out_abs)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            final = out / writing.relative_to(staging) if writing.is_relative_to(staging) else out
            raise OutputSpaceError(
                f"disk full at {final} ({e.strerror}); nothing of this call was kept: {out} "
                + ("holds what it held before" if out_abs.exists() else "was not created")
            ) from e
        raise
    finally:
        if staging.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    manifest = out / "generated.csv"
    grid = out / "preview.png"
    counts = df["label_name"].value_counts().to_dict()
    meta["near_copies_dropped"] = dropped
    print(
        f"generated {cfg.n} images {counts} in {time.time() - t0:.1f}s -> {manifest}"
        + (f" ({dropped} near-copies of training images dropped and redrawn)" if cfg.drop_near_copies else "")
    )
    run_id = None
    if cfg.log_mlflow:
        from pipeline import tracking
        from pipeline.config import flatten, to_dict

        # the outage-tolerant Tracker: with the server down the images are still written and the
        # run waits in OUT/tracking_outbox for `pipeline.run sync`. It starts after the swap, so
        # its outbox and metrics.jsonl land in the final folder beside the set they describe
        tags = {
            "stage": "generate",
            "source_sha256": lg.sha256,
            "generator_run_id": lg.run_id,  # lineage: the training run of the generator
            "git_commit": tracking.git_commit(),
            "mlflow.note.content": f"{cfg.n} synthetic images ({cfg.label}) from {lg.source}, seed {cfg.seed}",
        }
        with tracking.Tracker(cfg.tracking, out) as tr:
            tr.start(None, cfg.tracking.run_name or out.name, tags)
            tr.log_params({**flatten(to_dict(cfg)), "prior_used": used})
            metrics = {f"count/{k}": float(v) for k, v in counts.items()}
            tr.log_metrics({**metrics, "near_copies_dropped": float(dropped)}, step=0)
            tr.log_artifact(manifest, "generated")
            tr.log_artifact(grid, "generated")
            tr.log_dict(json.loads(json.dumps(meta, default=str)), "generated/generated.json")
        run_id = tr.run_id
        print(f"MLflow run id: {run_id}" if run_id else "MLflow: not reached; the run is kept in the outbox")
    return {
        "manifest": str(manifest),
        "n": cfg.n,
        "counts": counts,
        "run_id": run_id,
        "preview": str(grid),
        "near_copies_dropped": dropped,
        "prior": used,
    }
