"""A gain study's classifier child, now against a reference revision, in one run (a ratio).

    python benchmarks/bench_child.py [--reference d9a9eb8] [--fraction 0.1] [--arm classical]
                                     [--seeds 0 1] [--out docs/benchmarks/bench_child.json]

Each revision runs in its own process (the reference from a git worktree of ``--reference``) and
trains the same child twice per seed in that process, as a study does; the second child is timed
(a study's steady state: its first child pays imports and, where cached, decoding). The current
revision runs as a study runs it (``data.cache=disk`` warm, ``data.augment_on=device``: batched
augmentation, the vectorised bootstrap); the reference with its own defaults. Reports each
child's wall time, the ratio and the test AUROC of both (the same within seed noise is the check).
Needs ``data_manifests/kermany_pneumonia_224.csv`` (``python -m pipeline.run ingest
../shared/data/kermany_pneumonia_224``). Alternate the revisions (``--repeats``) on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DRIVER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
# this revision's packages, not the editable install's (its finder would map them to the checkout)
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, args["root"])
import pipeline
from pipeline.infra.config import load_config
from pipeline.infra.stage_configs import ClassifyConfig
from pipeline.classify import classify
out = {"pipeline": pipeline.__file__, "children": []}
for seed in args["seeds"]:
    for k in range(2):
        cfg = load_config(ClassifyConfig, args["config"], args["overrides"] + [f"seed={seed}", f"out_dir={args['out']}/s{seed}k{k}"])
        t0 = time.perf_counter()
        res = classify(cfg)
        out["children"].append({"seed": seed, "k": k, "s": time.perf_counter() - t0, "auroc": res["metrics"]["test/auroc"]})
print("RESULT " + json.dumps(out))
"""


def run(root: Path, overrides: list[str], seeds: list[int], tmp: Path, name: str) -> dict:
    args = {
        "root": str(root),
        "config": str(REPO / "configs" / "classify64.yaml"),
        "overrides": overrides,
        "seeds": seeds,
        "out": str(tmp / name),
    }
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(args)], cwd=REPO, env=env, capture_output=True, text=True
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    res = json.loads(line[len("RESULT ") :])
    if not res["pipeline"].startswith(str(root)):
        raise SystemExit(f"{name} imported {res['pipeline']}, not the revision under {root}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default="d9a9eb8")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--arm", default="classical")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    common = [
        "data.manifest=data_manifests/kermany_pneumonia_224.csv",
        f"fraction={a.fraction}",
        f"arm={a.arm}",
        "step_budget=real",
        "tracking.uri=sqlite:///{tmp}/bench.db",
    ]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        common = [c.replace("{tmp}", str(tmp)) for c in common]
        ref_root = tmp / "reference"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(ref_root), a.reference],
            check=True,
            capture_output=True,
        )
        try:
            now_over = [
                *common,
                "data.cache=disk",
                f"data.cache_dir={tmp / 'cache'}",
                "data.augment_on=device",
            ]
            rows = {"reference": [], "current": []}
            for _ in range(a.repeats):
                rows["reference"] += run(ref_root, common, a.seeds, tmp, "reference")["children"]
                rows["current"] += run(REPO, now_over, a.seeds, tmp, "current")["children"]
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(ref_root)], check=False
            )
    steady = {k: [c for c in v if c["k"] == 1] for k, v in rows.items()}
    mean = {k: sum(c["s"] for c in v) / len(v) for k, v in steady.items()}
    first = {
        k: sum(c["s"] for c in v if c["k"] == 0) / len([c for c in v if c["k"] == 0]) for k, v in rows.items()
    }
    auroc = {k: [round(c["auroc"], 4) for c in v] for k, v in steady.items()}
    result = {
        "cpu": platform.processor() or platform.machine(),
        "threads": os.cpu_count(),
        "reference": a.reference,
        "fraction": a.fraction,
        "arm": a.arm,
        "seeds": a.seeds,
        "child_s": {k: round(v, 2) for k, v in mean.items()},
        "first_child_s": {k: round(v, 2) for k, v in first.items()},
        "speedup": round(mean["reference"] / mean["current"], 2),
        "test_auroc": auroc,
        "children": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "children"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
