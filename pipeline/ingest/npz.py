"""MedMNIST-style ``.npz`` sources: each array image written once as a PNG (a manifest lists files)
and listed with its split; values are kept as they are, or mapped linearly, never wrapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.ingest.candidates import Candidate
from transforms.io import file_sha256
from transforms.manifest import SPLITS, atomic_writer


def _npz_pixels(npz_path: Path, arrays: dict[str, np.ndarray]) -> tuple[str, float, float]:
    """How the arrays' values become PNG pixels: ``("uint8" | "uint16" | "scaled", lo, hi)``.

    Integers that fit 8 or 16 bits are stored as they are; anything else (negative or wider
    integers, floats) is mapped linearly from the arrays' joint [min, max] to 0..65535. Never
    wrapped, never truncated."""
    kinds = {a.dtype.kind for a in arrays.values()}
    bad = kinds - set("uif")
    if bad:
        dt = next(a.dtype for a in arrays.values() if a.dtype.kind in bad)
        raise ValueError(f"{npz_path}: images of dtype {dt} are not pixel values (need integers or floats)")
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{npz_path}: {k} holds NaN or Inf values")
    lo = min(float(a.min()) for a in arrays.values() if a.size)
    hi = max(float(a.max()) for a in arrays.values() if a.size)
    if kinds <= set("ui") and lo >= 0 and hi <= 255:
        return "uint8", lo, hi
    if kinds <= set("ui") and lo >= 0 and hi <= 65535:
        return "uint16", lo, hi
    if hi == lo:
        raise ValueError(f"{npz_path}: every image value is {lo}: nothing to learn from")
    return "scaled", lo, hi


def _to_pixels(img: np.ndarray, mode: str, lo: float, hi: float) -> np.ndarray:
    if mode == "uint8":
        return img.astype(np.uint8)
    if mode == "uint16":
        return img.astype(np.uint16)
    return np.round((img.astype(np.float64) - lo) / (hi - lo) * 65535).astype(np.uint16)


def candidates_from_npz(npz_path: Path, extract_dir: Path) -> tuple[list[Candidate], Path, str]:
    """Write each array image as a PNG (paths must point at files) and list it with its split.

    The PNGs go to ``extract_dir/<stem>-<content hash>/``: a different file of the same name never
    reuses them, and the same file does."""
    try:
        data = np.load(npz_path)
    except Exception as e:
        raise ValueError(f"{npz_path}: not a readable .npz ({type(e).__name__}: {e})") from e
    present = [s for s in SPLITS if f"{s}_images" in data]
    if not present:
        raise ValueError(f"{npz_path}: no train_images, val_images or test_images array (has {list(data)})")
    arrays = {f"{s}_images": data[f"{s}_images"] for s in present}
    for k, a in arrays.items():
        if not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3, 4))):
            raise ValueError(f"{npz_path}: {k} has shape {a.shape}; expected (N, H, W) or (N, H, W, 1|3|4)")
    mode, lo, hi = _npz_pixels(npz_path, arrays)
    if mode != "uint8" and any(a.ndim == 4 and a.shape[-1] > 1 for a in arrays.values()):
        raise ValueError(f"{npz_path}: colour images need 8-bit values (0..255); these are {mode}")
    root = extract_dir / f"{npz_path.stem}-{file_sha256(npz_path)[:16]}"
    out = []
    for split in present:
        imgs = arrays[f"{split}_images"]
        labels = data.get(f"{split}_labels", None)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim > 1 and int(np.prod(labels.shape[1:])) > 1:
                raise ValueError(
                    f"{npz_path}: {split}_labels has {int(np.prod(labels.shape[1:]))} labels per image "
                    "(multi-label, e.g. ChestMNIST): only one class per image is supported"
                )
            if len(labels) != len(imgs):
                raise ValueError(f"{npz_path}: {len(imgs)} {split} images but {len(labels)} labels")
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(imgs)):
            p = root / split / f"{split}_{i:06d}.png"
            if not p.exists():  # same content hash: an existing PNG is this image
                img = imgs[i]
                if img.ndim == 3 and img.shape[-1] == 1:
                    img = img[..., 0]
                with atomic_writer(p, binary=True, fsync=False) as f:  # a re-run makes it again
                    Image.fromarray(_to_pixels(img, mode, lo, hi)).save(f, format="PNG")
            lab = None if labels is None else int(labels[i].ravel()[0])
            # MedMNIST carries no patient ids: each image is its own group.
            out.append(Candidate(p, lab, split, f"{npz_path.stem}-{split}-{i:06d}", "npz index"))
    note = {
        "uint8": "8-bit values stored as they are",
        "uint16": "16-bit values stored as they are (16-bit PNG)",
        "scaled": f"values mapped linearly from [{lo:g}, {hi:g}] to 0..65535 (16-bit PNG)",
    }[mode]
    return out, root, note
