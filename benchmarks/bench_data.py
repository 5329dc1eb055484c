"""Load + preprocess throughput (images/s) by file format: cold vs cached, 0/1/2 loader workers.

    python benchmarks/bench_data.py --manifest data_manifests/kermany_pneumonia_224.csv --size 64
    python benchmarks/bench_data.py --formats jpeg png dicom dicom-rle dicom-cr --limit 256 --workers 0 1 2

Formats (``--formats``; the same first ``--limit`` images of the manifest, converted once into a
temporary folder, so only the container differs):
  jpeg          the manifest's own files (Kermany: 224 px JPEG)
  png           8-bit greyscale PNG
  dicom         uncompressed 8-bit MONOCHROME2 DICOM
  dicom-rle     the same, RLE Lossless compressed
  dicom-cr      the real full-resolution CR chest DICOMs of ../shared/data/dicom_cxr (1955x1841
                15-bit MONOCHROME1, uncompressed and JPEG 2000; 1024 px JPEG baseline), cycled
                to ``--limit`` items: what a hospital export costs to decode

Arms, all in one process and through the same MONAI DataLoader (batch 64):
  cold          Dataset: decode + normalise + resize every image on every pass (the reference)
  cache-fill    CacheDataset construction: the one-off cost of the first pass
  cached        CacheDataset, a later pass (eval transforms: nothing left to compute)
  cached+aug    CacheDataset, a later pass with the train-time random augmentation
  disk-warm     PersistentDataset, a pass after the on-disk cache was written
Each is reported in images/s and as a ratio to ``cold`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.infra.data import DataConfig, build_dataset, make_loader, records  # noqa: E402


def _pass(ds, cfg: DataConfig) -> tuple[float, int]:
    loader = make_loader(ds, cfg, shuffle=False)
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    return time.perf_counter() - t, n


DICOM_CR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dicom_cxr"


def convert(items: list[dict], fmt: str, dest: Path) -> list[dict]:
    """The same images in another container (see the module docstring)."""
    import numpy as np
    from PIL import Image

    if fmt == "jpeg":
        return items
    if fmt == "dicom-cr":
        files = sorted(DICOM_CR.glob("*.dcm"))
        if not files:
            raise FileNotFoundError(f"{DICOM_CR} has no DICOM files")
        return [{"image": str(files[i % len(files)]), "label": 0} for i in range(len(items))]
    from pipeline.generate import write_dicom

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, it in enumerate(items):
        px = np.asarray(Image.open(it["image"]).convert("L"))
        if fmt == "png":
            p = dest / f"{i:05d}.png"
            Image.fromarray(px).save(p)
        elif fmt in ("dicom", "dicom-rle"):
            p = dest / f"{i:05d}.dcm"
            write_dicom(p, px, "bench", "1.2.3", i)
            if fmt == "dicom-rle":
                import pydicom
                from pydicom.uid import RLELossless

                ds = pydicom.dcmread(p)
                ds.compress(RLELossless)
                ds.save_as(p)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        out.append({"image": str(p), "label": it["label"]})
    return out


def _arms(items: list[dict], size: int, workers: int, cache_dir: Path) -> dict[str, float]:
    cfg = DataConfig(image_size=size, batch_size=64, num_workers=workers, cache_dir=str(cache_dir))
    arms: dict[str, float] = {}
    s, n = _pass(build_dataset(items, cfg, train=False, cache="none"), cfg)
    arms["cold"] = n / s
    t = time.perf_counter()
    cached = build_dataset(items, cfg, train=False, cache="memory")
    arms["cache-fill"] = len(items) / (time.perf_counter() - t)
    s, n = _pass(cached, cfg)
    arms["cached"] = n / s
    s, n = _pass(build_dataset(items, cfg, train=True, cache="memory"), cfg)
    arms["cached+aug"] = n / s
    disk = build_dataset(items, cfg, train=False, cache="disk")
    _pass(disk, cfg)  # writes the cache
    s, n = _pass(disk, cfg)
    arms["disk-warm"] = n / s
    return arms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/kermany_pneumonia_224.csv")
    ap.add_argument("--split", default=None, help="one split, or all rows when omitted")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader worker counts to measure")
    ap.add_argument("--formats", nargs="+", default=["jpeg"], help="jpeg png dicom dicom-rle dicom-cr")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # preprocessing is per-image work; keep runs comparable
    items = []
    for split in [args.split] if args.split else ["train", "val", "test"]:
        try:
            items += records(args.manifest, split)
        except ValueError:
            continue
    if args.limit:
        items = items[: args.limit]
    results: dict = {"manifest": args.manifest, "images": len(items), "size": args.size, "arms": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        for fmt in args.formats:
            try:
                fitems = convert(items, fmt, tmp / "src" / fmt)
            except FileNotFoundError as e:
                print(f"{fmt}: skipped ({e})", flush=True)
                continue
            for w in args.workers:
                results["arms"][f"{fmt} workers={w}"] = _arms(
                    fitems, args.size, w, tmp / "cache" / f"{fmt}-w{w}"
                )
                print(f"{fmt} workers={w}: done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{results['images']} images per format from {args.manifest} at {args.size} px")
    names = ["cold", "cache-fill", "cached", "cached+aug", "disk-warm"]
    print("| format, loader | " + " | ".join(f"{n} img/s (x cold)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key, arms in results["arms"].items():
        cells = [f"{arms[n]:,.0f} ({arms[n] / arms['cold']:.1f}x)" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
