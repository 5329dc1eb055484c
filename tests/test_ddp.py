"""torchrun with 2 CPU processes (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
from cxr_factory import REPO
from mlflow_server import free_port

from pipeline.infra.checkpoint import load_checkpoint


def _args(manifest, out, uri) -> list[str]:
    return [
        "train",
        f"data.manifest={manifest}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.augment=false",  # per-sample augmentation streams differ between 1 and 2 processes
        "model.latent_dim=8",
        "model.base_channels=8",
        "model.max_channels=32",
        "model.disc_channels=8",
        "model.num_classes=2",
        # no BatchNorm: PyTorch has no SyncBatchNorm on CPU; with instance norm N processes are
        # mathematically the same as one (CUDA runs convert BatchNorm to SyncBatchNorm instead)
        "model.norm=INSTANCE",
        "epochs=2",
        "grid_size=4",
        "threads=1",
        f"out_dir={out}",
        f"tracking.uri={uri}",
        "tracking.experiment=ddp",
        "tracking.run_name=ddp",
        "tracking.log_model=false",
    ]


def test_two_process_ddp_matches_one_process(tmp_path, phantom_manifest):
    import mlflow

    env = dict(os.environ, MLFLOW_TRACKING_URI="", TQDM_DISABLE="1", OMP_NUM_THREADS="1")

    def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.time()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:] + "\n---- stdout\n" + p.stdout[-3000:]
        return p, time.time() - t0

    run = [sys.executable, "-m"]
    one, t_one = timed(
        [*run, "pipeline.run", *_args(phantom_manifest, tmp_path / "one", f"sqlite:///{tmp_path / 'one.db'}")]
    )
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    torchrun = [*run, "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m"]
    two, t_two = timed([*torchrun, "pipeline.run", *_args(phantom_manifest, tmp_path / "two", uri)])
    print(f"wall time 1 process {t_one:.1f}s, 2 processes {t_two:.1f}s (ratio {t_one / t_two:.2f})")
    a = load_checkpoint(tmp_path / "one" / "ddp" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "ddp" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for group in ("encoder", "decoder", "discriminator"):
        keys = [k for k, v in a["models"][group].items() if v.is_floating_point()]
        va = torch.cat([a["models"][group][k].flatten() for k in keys])
        vb = torch.cat([b["models"][group][k].flatten() for k in keys])
        # the same computation up to the order of float additions in the all-reduce; Adam
        # normalises updates, so a near-zero gradient's rounding can flip a few tiny updates:
        # weights agree to ~5e-4 of their norm (a mis-dealt batch or noise gives ~1e-2)
        rel = ((va - vb).norm() / va.norm()).item()
        assert rel < 2e-3, f"{group}: relative difference {rel:.2e}"
    # rank 0 alone tracked: one run with metrics, one set of grids
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "val/ssim" in runs[0].data.metrics
    assert two.stdout.count("MLflow run id:") == 1


def test_gain_under_torchrun_matches_one_process(tmp_path, phantom_manifest):
    """The gain experiment under torchrun: every child (the generator's VAE-GAN and each
    classifier) trains data-parallel, rank 0 alone writes and logs, and the real-only classifier
    ends with the weights one process gives."""
    import mlflow

    env = dict(os.environ, MLFLOW_TRACKING_URI="", TQDM_DISABLE="1", OMP_NUM_THREADS="1")

    def args(out, uri) -> list[str]:
        return [
            "gain",
            f"classify.data.manifest={phantom_manifest}",
            "classify.data.image_size=32",
            "classify.data.batch_size=8",
            "classify.data.augment=false",
            "classify.model.widths=[8,16,16,16]",
            "classify.model.norm=instance",
            "classify.model.max_pool=false",  # instance norm needs more than 1x1 in the last stage
            "classify.epochs=2",
            "classify.bootstrap=20",
            "classify.threads=1",
            f"classify.tracking.uri={uri}",
            "arms=[real,synthetic]",
            "fractions=[1.0]",
            "seeds=[0]",
            "vaegan_overrides=[epochs=1,data.batch_size=8,data.augment=false,model.base_channels=8,"
            "model.latent_dim=8,model.num_classes=2,model.norm=INSTANCE,grid_size=4,tracking.log_model=false]",
            f"out_dir={out}",
            "tracking.run_name=g",
        ]

    def run(cmd):
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:] + "\n---- stdout\n" + p.stdout[-3000:]
        return p

    run([sys.executable, "-m", "pipeline.run", *args(tmp_path / "one", f"sqlite:///{tmp_path / 'one.db'}")])
    uri = f"sqlite:///{tmp_path / 'two.db'}"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    two = run([*torchrun, "-m", "pipeline.run", *args(tmp_path / "two", uri)])
    assert two.stdout.count("MLflow parent run id:") == 1
    for arm in ("real", "synthetic"):
        a = load_checkpoint(tmp_path / "one" / "g" / "children" / f"{arm}-f1-s0" / "classifier.pt")
        b = load_checkpoint(tmp_path / "two" / "g" / "children" / f"{arm}-f1-s0" / "classifier.pt")
        keys = [k for k, v in a["model"].items() if v.is_floating_point()]
        va = torch.cat([a["model"][k].flatten() for k in keys])
        vb = torch.cat([b["model"][k].flatten() for k in keys])
        rel = ((va - vb).norm() / va.norm()).item()
        assert rel < 2e-3, f"{arm}: relative weight difference {rel:.2e}"
    # one parent, one generator run and two classifier runs: nothing logged twice
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cxr-vaegan-gain").experiment_id])
    stages = sorted(r.data.tags.get("stage") for r in runs)
    assert stages == ["classify", "classify", "gain", "train"]
    assert (tmp_path / "two" / "g" / "gain_table.md").is_file()
