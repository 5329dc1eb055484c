"""MLflow set-up: an embedded sqlite store under ``mlflow/store`` unless told otherwise.

Order of precedence: ``tracking.uri`` in the config, then ``MLFLOW_TRACKING_URI``, then the
embedded store ``sqlite:///<repo>/mlflow/store/mlflow.db`` with artifacts in
``<repo>/mlflow/store/artifacts`` (both git-ignored).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STORE_DIR = REPO_ROOT / "mlflow" / "store"


@dataclass
class TrackingConfig:
    uri: str = ""  # empty: MLFLOW_TRACKING_URI, else the embedded sqlite store
    experiment: str = "cxr-vaegan"
    run_name: str = ""
    register_model: str = "cxr-vaegan-generator"  # empty: do not register the generator
    log_model: bool = True  # log (and register) the generator as an MLflow model at the end
    log_every: int = 10  # steps between per-step metric logs (each log is a host sync + a DB write)
    parent_run_id: str = ""  # make the run a child of this one (the gain experiment sets it)


def embedded_uri(store_dir: Path = STORE_DIR) -> str:
    store_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store_dir / 'mlflow.db'}"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "") or embedded_uri()


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id."""
    import mlflow

    uri = resolve_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # models are registered in the same store the runs go to
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        # with an sqlite store, keep artifacts beside the database rather than in ./mlruns
        loc = (
            (Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts").as_uri()
            if uri.startswith("sqlite:///")
            else None
        )
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=loc)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    """The code version: commit hash, with '-dirty' when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
