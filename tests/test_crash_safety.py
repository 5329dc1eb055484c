"""Crash safety: SIGKILL a real training process at 3 random points, restart with resume=auto.

The result must equal an uninterrupted run (CPU, deterministic), the latest checkpoint must load
after every kill, and it stays one MLflow run whose metric steps never go backwards.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from cxr_factory import REPO

from pipeline.infra.checkpoint import load_checkpoint


def _cmd(manifest: Path, out: Path, uri: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.run",
        "train",
        f"data.manifest={manifest}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.max_val=8",
        "model.latent_dim=8",
        "model.base_channels=8",
        "model.max_channels=32",
        "model.disc_channels=8",
        "epochs=8",
        "ckpt_every=3",
        "grid_size=4",
        "threads=1",
        "resume=auto",
        f"out_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=crash",
        "tracking.run_name=crash",
        "tracking.log_model=false",
        "tracking.log_every=1",
    ]


def _env() -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI="", TQDM_DISABLE="1")


def test_sigkill_three_times_then_resume_equals_straight_run(tmp_path, phantom_manifest):
    import mlflow

    # the uninterrupted reference
    ref = subprocess.run(
        _cmd(phantom_manifest, tmp_path / "ref", f"sqlite:///{tmp_path / 'ref.db'}"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    uri = f"sqlite:///{tmp_path / 'crash.db'}"
    out = tmp_path / "crash"
    last = out / "crash" / "checkpoints" / "last.pt"
    rng = random.Random(1234)
    kills, attempts = 0, 0
    while kills < 3 and attempts < 10:
        attempts += 1
        before = last.stat().st_mtime_ns if last.is_file() else 0
        proc = subprocess.Popen(
            _cmd(phantom_manifest, out, uri),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # wait until training is under way (a checkpoint newer than before), then kill at random
        deadline = time.time() + 120
        while (not last.is_file() or last.stat().st_mtime_ns == before) and proc.poll() is None:
            assert time.time() < deadline, "training never wrote a checkpoint"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            # the checkpoint on disk is whole and loads safely after every kill
            ck = load_checkpoint(last)
            assert ck["step"] >= 0
        else:
            break  # finished before the kill landed: nothing left to interrupt
    assert kills == 3, f"only {kills} kills landed"
    fin = subprocess.run(
        _cmd(phantom_manifest, out, uri), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert fin.returncode == 0, fin.stderr[-2000:]

    a = load_checkpoint(tmp_path / "ref" / "crash" / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 8
    for group in ("encoder", "decoder", "discriminator"):
        for k, v in a["models"][group].items():
            torch.testing.assert_close(b["models"][group][k], v, msg=f"{group}.{k}")

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("crash")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "resume=auto must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "train/kl")
    steps = [m.step for m in sorted(hist, key=lambda m: m.timestamp)]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "metric steps went backwards"
    assert steps[-1] == b["step"]
