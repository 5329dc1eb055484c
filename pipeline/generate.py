"""``python -m pipeline.run generate checkpoint=<path|MLflow model URI> n=N label=<name|balanced> out=DIR``.

Writes labelled synthetic radiographs as PNG (and, with ``dicom=true``, DICOM Secondary Capture
objects marked derived/synthetic, carrying no patient data from anywhere) plus a manifest of the
generated set that the rest of the pipeline reads like any other: label, seed, index, source
checkpoint and its SHA-256. The same seed gives the same images: all latent codes are drawn from
one CPU generator seeded once, so image ``i`` does not depend on the batch size or the device.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from networks.vaegan import Decoder, Generator, autoencoder_kwargs
from pipeline.tracking import TrackingConfig

SYNTHETIC_COLUMNS = ("synthetic", "seed", "index", "source", "source_sha256")


@dataclass
class GenerateConfig:
    checkpoint: str = ""  # a train checkpoint (.pt) or an MLflow model URI (runs:/..., models:/...)
    n: int = 64
    label: str = "balanced"  # balanced | a class name | a class index
    out: str = "outputs/generated"
    seed: int = 0
    batch_size: int = 256
    dicom: bool = False  # also write DICOM Secondary Capture objects
    device: str = "auto"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cxr-vaegan-generate"))
    log_mlflow: bool = True
    # drop near-copies of training images: a manifest whose train split is the generator's
    # training set; its test split sets the threshold (the near_copy_percentile-th percentile of
    # test-to-train nearest-neighbour distances); dropped images are replaced by new draws
    drop_near_copies: str = ""
    near_copy_percentile: float = 1.0

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint is required: a train checkpoint (.pt) or an MLflow model URI")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class LoadedGenerator:
    generator: Generator
    label_names: dict[int, str]
    source: str
    sha256: str

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


def load_generator(source: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """A generator from a train checkpoint (``weights_only`` load) or an MLflow model URI."""
    from pipeline import checkpoint as ckpt

    src = str(source)
    if "://" in src or src.startswith(("runs:", "models:")):
        import mlflow.pytorch

        try:
            gen = mlflow.pytorch.load_model(src, map_location=torch.device(device))
        except Exception as e:
            raise ckpt.CheckpointError(
                f"MLflow model {src} cannot be loaded ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(gen, Generator):
            raise ckpt.CheckpointError(f"MLflow model {src} is a {type(gen).__name__}, not a Generator")
        names = {int(k): v for k, v in getattr(gen, "label_names", {}).items()}
        return LoadedGenerator(gen.to(device).eval(), names, src, state_sha256(gen))
    payload = ckpt.load_checkpoint(src)
    from pipeline.train import config_from_checkpoint

    mcfg = config_from_checkpoint(payload).model
    dec = Decoder(**autoencoder_kwargs(mcfg), head=mcfg.decoder_head)
    ckpt.load_module_state(dec, payload["models"]["decoder"], "decoder", src)
    names = {int(k): str(v) for k, v in payload.get("label_names", {}).items()}
    return LoadedGenerator(Generator(dec, names).to(device).eval(), names, src, file_sha256(src))


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


@torch.no_grad()
def sample_images(lg: LoadedGenerator, labels: np.ndarray, seed: int, batch_size: int = 256) -> torch.Tensor:
    """``[N, 1, S, S]`` float images in ``[-1, 1]`` on the CPU, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), lg.generator.decoder.latent_dim, generator=g)
    dev = next(lg.generator.parameters()).device
    out = []
    for i in range(0, len(labels), batch_size):
        lab = torch.as_tensor(labels[i : i + batch_size], device=dev)
        out.append(
            lg.generator(z[i : i + batch_size].to(dev), None if lg.num_classes == 0 else lab).float().cpu()
        )
    return torch.cat(out)


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
        new = sample_images(lg, labels[bad], cfg.seed + 7919 * r, cfg.batch_size)
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


def write_dicom(path: Path, pixels: np.ndarray, label_name: str, series_uid: str, index: int) -> None:
    """A Secondary Capture object marked synthetic: no patient data is copied from anywhere."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
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


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write the images and their manifest; returns the manifest path, counts and MLflow run id."""
    from PIL import Image

    from pipeline.engine import check_writable, pick_device
    from pipeline.manifest import COLUMNS, write_manifest
    from pipeline.viz import save_grid

    out = Path(cfg.out)
    check_writable(out)
    device = pick_device(cfg.device)
    lg = load_generator(cfg.checkpoint, device)
    labels = resolve_labels(cfg.label, cfg.n, lg)
    t0 = time.time()
    images = sample_images(lg, labels, cfg.seed, cfg.batch_size)
    dropped = 0
    if cfg.drop_near_copies:
        images, labels, dropped = _drop_near_copies(cfg, lg, images, labels)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if cfg.dicom:
        from pydicom.uid import generate_uid

        (out / "dicom").mkdir(parents=True, exist_ok=True)
        series_uid = generate_uid()
    rows = []
    for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
        name = lg.label_names.get(int(lab), "unlabelled" if lab < 0 else str(int(lab)))
        px = to_uint8(img)
        rel = f"images/syn_{i:06d}_{name}.png"
        Image.fromarray(px).save(out / rel)
        if cfg.dicom:
            write_dicom(out / "dicom" / f"syn_{i:06d}_{name}.dcm", px, name, series_uid, i)
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
    manifest = out / "generated.csv"
    meta = {
        "data_root_abs": str(out.resolve()),
        "source": lg.source,
        "source_sha256": lg.sha256,
        "seed": cfg.seed,
        "n": cfg.n,
        "label": cfg.label,
        "label_names": lg.label_names,
        "synthetic": True,
    }
    write_manifest(manifest, df, meta, extra=SYNTHETIC_COLUMNS)
    grid = save_grid(images[:64], out / "preview.png", nrow=8, upscale=max(1, 128 // lg.image_size))
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
        # run waits in OUT/tracking_outbox for `pipeline.run sync`
        tags = {"stage": "generate", "source_sha256": lg.sha256, "git_commit": tracking.git_commit()}
        with tracking.Tracker(cfg.tracking, out) as tr:
            tr.start(None, cfg.tracking.run_name or out.name, tags)
            tr.log_params(flatten(to_dict(cfg)))
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
    }
