"""Load + preprocess throughput (images/s) for a manifest split: cold vs cached.

    python benchmarks/bench_data.py --manifest data_manifests/kermany_pneumonia_224.csv --size 64

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

from pipeline.data import DataConfig, build_dataset, make_loader, records  # noqa: E402


def _pass(ds, cfg: DataConfig) -> tuple[float, int]:
    loader = make_loader(ds, cfg, shuffle=False)
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    return time.perf_counter() - t, n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/kermany_pneumonia_224.csv")
    ap.add_argument("--split", default=None, help="one split, or all rows when omitted")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0], help="DataLoader worker counts to measure")
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
        for w in args.workers:
            cfg = DataConfig(image_size=args.size, batch_size=64, num_workers=w, cache_dir=str(tmp / f"w{w}"))
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
            results["arms"][f"workers={w}"] = arms
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{results['images']} images from {args.manifest} at {args.size} px")
    print(f"{'loader':<11} {'arm':<11} {'images/s':>10} {'x cold':>8}")
    for wname, arms in results["arms"].items():
        for arm, v in arms.items():
            print(f"{wname:<11} {arm:<11} {v:>10.1f} {v / arms['cold']:>8.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
