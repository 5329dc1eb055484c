"""Run the walk-through (docs/walkthrough.md) verbatim in a fresh clone; check every run's experiment.

    python tests/readme_walkthrough.py [--shared symlink|copy] [--keep]

Clones this repository (its committed HEAD) into a temporary folder, lays ``../shared`` beside
the clone as a symlink to this checkout's ``../shared`` or as a copy of it, puts this checkout's
virtual environment first on PATH (``source .venv/bin/activate`` as the manual says), runs each
line of the block marked ``<!-- walkthrough -->`` in docs/walkthrough.md with bash from the clone's
root, stops at the first failure, then checks that every command whose comment names an
experiment left a FINISHED run of that name in it (embedded store ``mlflow/store`` of the clone).
Not part of the test suite: it trains on real data for several minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the page that holds the block marked <!-- walkthrough --> (README.md links to it)
PAGE = REPO / "docs" / "walkthrough.md"


def walkthrough_lines() -> list[str]:
    text = PAGE.read_text()
    m = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```", text, re.S)
    if not m:
        sys.exit(f"{PAGE.relative_to(REPO)} has no walkthrough block")
    return [line for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def expected_run(line: str) -> tuple[str, str] | None:
    """(experiment, run name) a line promises, from its comment and its run name."""
    exp = re.search(r"# experiment (\S+)", line)
    if not exp:
        return None
    name = re.search(r"(?:tracking\.)?run_name=(\S+)", line)
    return exp.group(1), name.group(1) if name else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", choices=("symlink", "copy"), default="symlink")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = ap.parse_args()
    shared = (REPO.parent / "shared").resolve()
    if not (shared / "data").is_dir():
        sys.exit(f"{shared}/data is missing: the walk-through needs the real data")
    root = Path(tempfile.mkdtemp(prefix="walkthrough-"))
    clone = root / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if args.shared == "symlink":
        (root / "shared").symlink_to(shared)
    else:
        shutil.copytree(shared, root / "shared", symlinks=False)
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", TQDM_DISABLE="1")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CXR_VAEGAN_STORE"):
        env.pop(k, None)
    print(f"clone: {clone} (../shared as a {args.shared})", flush=True)
    ok = True
    for i, line in enumerate(walkthrough_lines(), 1):
        t0 = time.time()
        proc = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True)
        print(
            f"[{i}] rc={proc.returncode} {time.time() - t0:.0f}s  {line.split('#')[0].strip()[:150]}",
            flush=True,
        )
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            ok = False
            break
    if ok:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow/store/mlflow.db'}")
        for line in walkthrough_lines():
            want = expected_run(line)
            if want is None:
                continue
            exp = client.get_experiment_by_name(want[0])
            runs = client.search_runs([exp.experiment_id]) if exp else []
            names = {r.info.run_name: r.info.status for r in runs}
            # gain's parent run is named by run_name=; every other stage by tracking.run_name=
            good = names.get(want[1]) == "FINISHED"
            print(f"{'ok ' if good else 'BAD'} experiment {want[0]}: run {want[1]!r} -> {names.get(want[1])}")
            ok &= good
        stray = [p.name for p in (clone / "mlflow.db", clone / "mlruns") if p.exists()]
        print(f"{'BAD' if stray else 'ok '} no stray MLflow store in the clone's root {stray or ''}")
        ok &= not stray
    print("walk-through: " + ("every command succeeded" if ok else "FAILED"))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
