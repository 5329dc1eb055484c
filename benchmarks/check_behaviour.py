"""Behaviour unchanged across a refactor: a seeded 2-epoch phantom train, a classify run of every
arm (four of them again with the augmentation on the device) and a tiny gain study, each through the real CLI, reduced to digests of their weights, their
logged metrics (wall-clock ones left out) and the study's item keys.

    python benchmarks/check_behaviour.py --out /tmp/now.json
    PYTHONPATH=<checkout of REV> python benchmarks/check_behaviour.py --out /tmp/ref.json
    python benchmarks/check_behaviour.py --compare /tmp/ref.json /tmp/now.json

The same machine and torch build give bit-identical digests when the code computes the same
thing (every stage runs on one thread with ``set_determinism``); the comparison names what moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# wall-clock or machine-dependent values: not behaviour
TIMING = ("time", "_s", "wall", "sec", "throughput", "per_s", "img_s", "speed")
ARMS = (
    "real",
    "classical",
    "synthetic",
    "classical+synthetic",
    "synthetic_only",
    "real_dup",
    "balanced_synthetic",
    "synthetic_pretrain",
    "synthetic_filtered",
)
TINY_TRAIN = [
    "data.image_size=32",
    "data.batch_size=8",
    "model.latent_dim=8",
    "model.base_channels=8",
    "model.max_channels=32",
    "model.disc_channels=8",
    "model.num_classes=2",
    "grid_size=8",
    "threads=1",
    "tracking.log_every=1",
    "tracking.log_model=false",
    "speed.mode=off",
]
TINY_CLASSIFY = [
    "data.image_size=32",
    "data.batch_size=16",
    "model.widths=[8,16,16,16]",
    "epochs=2",
    "bootstrap=20",
    "threads=1",
]


def cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise SystemExit(
            f"{' '.join(args[:2])} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p.stdout


def tensors_digest(path: Path) -> dict[str, str]:
    """Per top-level entry of a checkpoint: SHA-256 over its tensors in key order."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, value in sorted(payload.items()):
        h, n = hashlib.sha256(), 0
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                h.update(v.detach().contiguous().numpy().tobytes())
                n += 1
            elif isinstance(v, dict):
                stack.extend(v[k] for k in sorted(v, key=str, reverse=True))
            elif isinstance(v, (list, tuple)):
                stack.extend(reversed(v))
        if n:
            out[name] = h.hexdigest()[:16]
    return out


def run_metrics(store: Path) -> dict[str, dict[str, list[float]]]:
    """Every non-timing metric history of every run in a store, by run name."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    out: dict[str, dict[str, list[float]]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            hist = {}
            for key in sorted(run.data.metrics):
                if any(t in key for t in TIMING):
                    continue
                hist[key] = [
                    m.value
                    for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
                ]
            out[run.info.run_name] = hist
    return out


def measure(work: Path) -> dict:
    from transforms.phantoms import ensure_phantom_dataset

    ensure_phantom_dataset(work / "png", n_per_class=20, n_test_per_class=6, size=64, seed=0)
    manifest = work / "phantoms.csv"
    cli("ingest", str(work / "png"), f"--out={manifest}", "val_fraction=0.2", cwd=work)
    store = work / "mlflow.db"
    uri = f"tracking.uri=sqlite:///{store}"
    cli(
        "train",
        f"data.manifest={manifest}",
        *TINY_TRAIN,
        "epochs=2",
        "seed=3",
        f"out_dir={work / 'train'}",
        "tracking.run_name=gen",
        uri,
        "tracking.register_model=''",
        cwd=work,
    )
    gen = work / "train" / "gen" / "checkpoints" / "last.pt"
    result: dict = {"train": tensors_digest(gen), "classify": {}}
    judge = None
    for arm in ARMS:
        extra = [f"synthetic={gen}"] if "synthetic" in arm else []
        if arm == "synthetic_filtered":
            extra.append(f"filter_classifier={judge}")  # the spelling every revision reads
        cli(
            "classify",
            f"data.manifest={manifest}",
            *TINY_CLASSIFY,
            f"arm={arm}",
            "seed=1",
            *extra,
            f"out_dir={work / 'cls'}",
            f"tracking.run_name={arm.replace('+', '_')}",
            uri,
            cwd=work,
        )
        folder = work / "cls" / arm.replace("+", "_")
        res = json.loads((folder / "result.json").read_text())
        if arm == "real":
            judge = res["checkpoint"]
        result["classify"][arm] = {
            "weights": tensors_digest(Path(res["checkpoint"])),
            "metrics": {k: v for k, v in sorted(res["metrics"].items()) if not any(t in k for t in TIMING)},
        }
    # the classical and mixing arms again with the augmentation on whole batches (the study's setting)
    for arm in ("classical", "classical+synthetic", "real_dup", "synthetic"):
        extra = [f"synthetic={gen}"] if "synthetic" in arm else []
        name = f"{arm.replace('+', '_')}-device"
        cli(
            "classify", f"data.manifest={manifest}", *TINY_CLASSIFY, f"arm={arm}", "seed=1", *extra,
            "data.augment_on=device", f"out_dir={work / 'cls'}", f"tracking.run_name={name}", uri,
            cwd=work,
        )
        res = json.loads((work / "cls" / name / "result.json").read_text())
        result["classify"][f"{arm}/device"] = {
            "weights": tensors_digest(Path(res["checkpoint"])),
            "metrics": {k: v for k, v in sorted(res["metrics"].items()) if not any(t in k for t in TIMING)},
        }
    records = work / "records"
    cli(
        "gain",
        f"classify.data.manifest={manifest}",
        *(f"classify.{a}" for a in TINY_CLASSIFY),
        "arms=[real,real_dup,classical,synthetic,synthetic_filtered,synthetic_only]",
        "fractions=[0.5,1.0]",
        "seeds=[0]",
        "generator_steps=6",
        "holdout_fraction=0.2",
        "vaegan_overrides=[data.batch_size=4,model.base_channels=8,model.latent_dim=8,model.num_classes=2,threads=1,speed.mode=off]",
        f"out_dir={work / 'gain'}",
        f"records={records}",
        "run_name=t",
        f"classify.{uri}",
        cwd=work,
    )
    items = {}
    for kind in ("children", "generators"):
        for f in sorted((records / kind).glob("*.json")):
            rec = json.loads(f.read_text())
            keep = {k: v for k, v in rec.items() if k in ("key", "metrics", "steps", "fidelity", "gate")}
            items[f"{kind}/{f.stem}"] = json.loads(
                json.dumps(keep, sort_keys=True, default=str),
                parse_float=lambda s: s,  # compared as written
            )
    result["gain"] = items
    result["mlflow"] = run_metrics(store)
    return result


def diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'now' if k in b else 'reference'}")
            else:
                out.extend(diff(a[k], b[k], f"{path}/{k}"))
        return out
    return [] if a == b else [f"{path}: {str(a)[:80]} -> {str(b)[:80]}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the digests here")
    ap.add_argument("--compare", nargs=2, metavar=("REF", "NOW"))
    args = ap.parse_args()
    if args.compare:
        ref, now = (json.loads(Path(p).read_text()) for p in args.compare)
        moved = diff(ref, now)
        print("\n".join(moved) if moved else "identical: weights, metrics and keys")
        return 1 if moved else 0
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp))
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
