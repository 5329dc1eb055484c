"""The embedded default data set: procedurally drawn chest-radiograph phantoms of two classes.

A fresh machine is offline and real data may be absent, so ``python -m pipeline.run train`` with
no data argument trains on these. Each phantom has a body outline, two lung fields, mediastinum
and heart (on the image's right: the patient's left), spine, ribs over the lungs, clavicles and
diaphragm domes, with random anatomy, exposure and noise. Class 1 ("pneumonia") adds patchy
consolidation in one or both lungs. They are written as 8-bit PNGs in the Kaggle layout and
ingested by the normal ingest stage, so training reads them exactly like real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PHANTOM_VERSION = 2  # bump when the drawing changes, so cached sets are regenerated


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, soft: float = 0.04
) -> np.ndarray:
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip((1.0 - r) / soft, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Low-frequency noise: coarse random grid upsampled bilinearly."""
    from skimage.transform import resize

    coarse = rng.standard_normal((max(2, size // scale), max(2, size // scale)))
    return resize(coarse, (size, size), order=1, mode="reflect", anti_aliasing=False)


def draw_phantom(rng: np.random.Generator, size: int = 128, pneumonia: bool = False) -> np.ndarray:
    """One phantom in [0, 1] (bright = dense), shape ``(size, size)``, upright."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - small anatomical jitter
    img = np.zeros((size, size))
    # soft tissue of the torso
    body = _ellipse(yy, xx, 0.58 + j(0.02), 0.5 + j(0.02), 0.55, 0.44 + j(0.03), soft=0.15)
    img += 0.45 * body
    # lungs: darker fields; the left lung (image right) is smaller because of the heart
    lung_top, lung_h = 0.22 + j(0.03), 0.30 + j(0.03)
    lr = _ellipse(yy, xx, lung_top + lung_h, 0.32 + j(0.02), lung_h, 0.14 + j(0.015), soft=0.12)
    ll = _ellipse(yy, xx, lung_top + lung_h + 0.02, 0.68 + j(0.02), lung_h - 0.02, 0.13 + j(0.015), soft=0.12)
    # diaphragm domes cut the lung bases
    for cx, side in ((0.32, lr), (0.68, ll)):
        dome = _ellipse(yy, xx, lung_top + 2 * lung_h + 0.07 + j(0.02), cx, 0.12, 0.2, soft=0.2)
        side *= 1 - dome
    lungs = np.clip(lr + ll, 0, 1)
    img -= 0.33 * lungs
    # mediastinum and heart
    img += 0.25 * _ellipse(yy, xx, 0.45, 0.5 + j(0.01), 0.3, 0.07, soft=0.3)
    heart = _ellipse(yy, xx, 0.62 + j(0.02), 0.56 + j(0.02), 0.13 + j(0.015), 0.15 + j(0.02), soft=0.25)
    img += 0.3 * heart
    # spine
    img += 0.12 * np.clip(1 - np.abs(xx - 0.5) / 0.035, 0, 1) * (yy > 0.1)
    # ribs: curved bright bands over the lung fields, both sides
    phase = rng.uniform(0, 2 * np.pi)
    for side in (-1, 1):
        dx = np.abs(xx - 0.5)
        curve = yy + 0.9 * (dx - 0.05) ** 2 * 2.2
        ribs = 0.5 + 0.5 * np.cos(2 * np.pi * curve / (0.075 + j(0.004)) + phase)
        mask = (np.sign(xx - 0.5) == side) * (dx > 0.05)
        img += 0.08 * ribs**3 * mask * np.clip(body * 1.5, 0, 1) * (yy < 0.8)
    # clavicles
    for side in (-1, 1):
        cy = 0.2 + j(0.015) + 0.15 * (np.abs(xx - 0.5) - 0.2) ** 2
        img += (
            0.12
            * np.clip(1 - np.abs(yy - cy) / 0.012, 0, 1)
            * (np.abs(xx - 0.5) < 0.33)
            * (np.sign(xx - 0.5) == side)
        )
    if pneumonia:
        # patchy consolidation: textured blobs inside one or both lungs. Version 2 made them
        # denser and larger (amplitude 0.18-0.3 -> 0.3-0.45): a classifier trained on 320
        # version-1 phantoms reached test AUROC 0.91, too weak a judge of generated ones
        n = rng.integers(1, 4)
        for _ in range(n):
            cx = rng.choice([0.32, 0.68]) + j(0.06)
            cy = lung_top + lung_h * rng.uniform(0.6, 1.6)
            blob = _ellipse(yy, xx, cy, cx, rng.uniform(0.08, 0.15), rng.uniform(0.06, 0.12), soft=0.5)
            texture = 0.6 + 0.4 * np.clip(_smooth_noise(rng, size, 8), -1, 1)
            img += rng.uniform(0.3, 0.45) * blob * texture * lungs
    # exposure, lung texture, quantum noise
    img += 0.03 * _smooth_noise(rng, size, 16) * lungs
    img = img * rng.uniform(0.9, 1.1) + j(0.04)
    img += rng.normal(0, 0.015, img.shape)
    return np.clip(img + 0.15, 0, 1)


def ensure_phantom_dataset(
    root: str | Path = "data/phantoms",
    n_per_class: int = 160,
    n_test_per_class: int = 40,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the phantom PNGs once (cached by version/parameters) and return the folder."""
    from PIL import Image

    root = Path(root)
    spec = {
        "version": PHANTOM_VERSION,
        "n": n_per_class,
        "n_test": n_test_per_class,
        "size": size,
        "seed": seed,
    }
    stamp = root / "phantoms.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", n_test_per_class)):
        for label, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = draw_phantom(rng, size, pneumonia=bool(label))
                # one 'patient' per image: phantom<id>-0001
                Image.fromarray((arr * 255).round().astype(np.uint8)).save(
                    d / f"phantom-{split}{label}{i:04d}-0001.png"
                )
    stamp.write_text(json.dumps(spec))
    return root
