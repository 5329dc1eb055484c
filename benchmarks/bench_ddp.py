"""Data-parallel throughput: ``torchrun --nproc_per_node=N`` against one process, same global batch.

    python benchmarks/bench_ddp.py --manifest data_manifests/kermany_pneumonia_224.csv --images 1024

Runs ``python -m pipeline.run train`` for one epoch on the first ``--images`` training images at
64 px: one process with all ``--cores`` threads, one process with ``cores / N`` threads (what
one replica gets), and N processes under torchrun with ``cores / N`` threads each. The training
rate is read from each run's epoch line (``epoch 1/1 step S T s``: the training loop plus a
64-image validation pass, no start-up or caching), so the ratio compares the loops, not Python
start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, args: argparse.Namespace, tmp: Path) -> dict:
    name = f"p{nproc}-t{threads}"
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m"]
    cmd += [
        "pipeline.run",
        "train",
        f"data.manifest={args.manifest}",
        "data.image_size=64",
        f"data.batch_size={args.batch}",
        f"data.max_train={args.images}",
        "data.max_val=64",
        "model.num_classes=2",
        "epochs=1",
        f"threads={threads}",
        f"out_dir={tmp / name}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"tracking.run_name={name}",
        "tracking.log_model=false",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    m = re.search(r"^epoch 1/1 step (\d+) ([\d.]+)s", p.stdout, re.M)
    steps, seconds = int(m.group(1)), float(m.group(2))
    images = steps * args.batch
    return {
        "processes": nproc,
        "threads_each": threads,
        "epoch_s": seconds,
        "images": images,
        "images_per_s": images / seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default="data_manifests/kermany_pneumonia_224.csv")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    per = max(args.cores // args.nproc, 1)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as d:
        tmp = Path(d)
        rows = [run(1, args.cores, args, tmp), run(1, per, args, tmp), run(args.nproc, per, args, tmp)]
    base = rows[0]["images_per_s"]
    print(f"| processes x threads | epoch (s) | images/s | vs 1 x {args.cores} |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['processes']} x {r['threads_each']} | {r['epoch_s']:.1f} | {r['images_per_s']:.1f} "
            f"| {r['images_per_s'] / base:.2f}x |"
        )
    res = {"rows": rows, "ratio_ddp_vs_one": rows[2]["images_per_s"] / base}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
