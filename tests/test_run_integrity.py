"""Runs never silently end up with the wrong weights or records: resume continues the named run
only and with the same config, one process per run folder, a damaged newest checkpoint falls
back to the previous one, every MLflow run ends (FINISHED, FAILED or KILLED), a fresh run under a
reused name never mixes in the old run's files, and a full disk is named."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from cxr_factory import REPO, tiny_train_config

from pipeline.infra import checkpoint as ckpt
from pipeline.infra.config import ConfigError, load_config
from pipeline.infra.locks import RunBusyError
from pipeline.train import TrainConfig, train


def _cfg(manifest, tmp_path: Path, *extra: str) -> TrainConfig:
    return tiny_train_config(manifest, tmp_path, "data.max_train=16", "tracking.experiment=integrity", *extra)


def _client(tmp_path: Path):
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _runs(tmp_path: Path) -> list:
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("integrity")
    return [] if exp is None else client.search_runs([exp.experiment_id])


# ------------------------------------------------------------------------------------ resume
def test_resume_auto_continues_the_named_run_only(tmp_path, phantom_manifest):
    a = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    time.sleep(0.05)
    b = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=b", "model.kind=vae"))  # newest
    resumed = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a", "resume=auto", "epochs=2"))
    assert resumed["run_id"] == a["run_id"] != b["run_id"]
    assert Path(resumed["run_dir"]).name == "a"
    assert ckpt.load_checkpoint(resumed["checkpoint"])["epoch"] == 2
    assert ckpt.load_checkpoint(b["checkpoint"])["epoch"] == 1  # run b untouched


def test_resume_auto_needs_a_run_name(tmp_path, phantom_manifest):
    with pytest.raises(ValueError, match="tracking.run_name"):
        train(_cfg(phantom_manifest, tmp_path, "resume=auto"))


def test_resume_with_another_config_refuses_with_the_difference(tmp_path, phantom_manifest):
    train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    with pytest.raises(ckpt.CheckpointError, match=r"optim.lr: checkpoint 0.0003, now 0.001"):
        train(
            _cfg(
                phantom_manifest, tmp_path, "tracking.run_name=a", "resume=auto", "epochs=2", "optim.lr=1e-3"
            )
        )


# ------------------------------------------------------------------------ one process per run
def test_a_second_process_on_the_same_run_is_refused(tmp_path, phantom_manifest):
    run_dir = tmp_path / "out" / "a"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.infra.locks import RunLock\n"
            f"with RunLock({str(run_dir)!r}):\n    print('locked', flush=True); time.sleep(120)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusyError, match=rf"another process \(pid {holder.pid}\)"):
            train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
        assert not (run_dir / "metrics.jsonl").exists()  # nothing was written into the run
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock went with it
    assert train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))["run_id"]


# --------------------------------------------------------------------- damaged newest checkpoint
def test_a_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path, phantom_manifest, capfd):
    first = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a", "epochs=2"))
    ck = Path(first["checkpoint"])
    prev = ckpt.previous_path(ck)
    assert ckpt.load_checkpoint(prev)["epoch"] == 1  # the checkpoint before the last one is kept
    ck.write_bytes(ck.read_bytes()[:1000])  # truncated, as by a failing disk or a partial copy
    stale = ck.parent / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a write")
    capfd.readouterr()
    res = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a", "resume=auto", "epochs=3"))
    err = capfd.readouterr().err
    assert "resuming from the previous checkpoint" in err and str(prev) in err
    assert res["run_id"] == first["run_id"]
    assert ckpt.load_checkpoint(res["checkpoint"])["epoch"] == 3
    assert not stale.exists()


def test_the_newest_checkpoint_exists_at_every_moment_of_a_save(tmp_path, monkeypatch):
    """A kill can land between any two file operations of a save: at none of them may last.pt be
    missing (it once was, between moving it to last.prev.pt and renaming the new one in)."""
    import os

    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})
    real_replace, seen = os.replace, []

    def watching_replace(src, dst):
        seen.append(path.is_file())
        real_replace(src, dst)
        seen.append(path.is_file())

    monkeypatch.setattr(os, "replace", watching_replace)
    ckpt.save_checkpoint(path, {"step": 2})
    assert seen and all(seen)
    assert (
        ckpt.load_checkpoint(path)["step"] == 2
        and ckpt.load_checkpoint(ckpt.previous_path(path))["step"] == 1
    )
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


# ------------------------------------------------------------------------ every run ends
@pytest.mark.parametrize("key", ["tracking.log_every=0", "guard.lr_factor=0", "optim.lr=0", "grid_size=0"])
def test_config_is_validated_before_any_run_starts(tmp_path, phantom_manifest, key):
    with pytest.raises(ConfigError):
        _cfg(phantom_manifest, tmp_path, "tracking.run_name=a", key)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_run_that_fails_after_it_started_ends_failed(tmp_path, phantom_manifest, monkeypatch):
    calls = []
    real_save = ckpt.save_checkpoint

    def failing_save(path, payload, **kw):
        calls.append(path)
        raise RuntimeError("simulated failure after the run started")

    monkeypatch.setattr(ckpt, "save_checkpoint", failing_save)
    with pytest.raises(RuntimeError, match="simulated"):
        train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    runs = _runs(tmp_path)
    assert calls and runs and all(r.info.status == "FAILED" for r in runs)


def test_a_dead_runs_name_reused_marks_it_killed_and_mixes_nothing(tmp_path, phantom_manifest):
    old = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    # as a SIGKILLed process leaves it: still RUNNING in MLflow, its files in the run folder
    _client(tmp_path).update_run(old["run_id"], "RUNNING")
    n_old = len((Path(old["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    new = train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    assert new["run_id"] != old["run_id"]
    assert _client(tmp_path).get_run(old["run_id"]).info.status == "KILLED"
    assert _client(tmp_path).get_run(new["run_id"]).info.status == "FINISHED"
    # the new run's local record holds its own steps only; the old folder is kept beside it
    lines = (Path(new["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == n_old
    moved = list((tmp_path / "out").glob("a.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps)


# ------------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing_names_the_file_and_keeps_the_last_good_one(
    tmp_path, phantom_manifest, monkeypatch
):
    real = torch.save
    n = {"calls": 0}

    def save(obj, f, *a, **k):
        n["calls"] += 1
        if n["calls"] > 1:  # the first (pre-training) checkpoint is written, the next one is not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(ckpt.DiskFullError, match=r"disk full at .*a/checkpoints/last.pt"):
        train(_cfg(phantom_manifest, tmp_path, "tracking.run_name=a"))
    monkeypatch.setattr(ckpt.torch, "save", real)
    folder = tmp_path / "out" / "a" / "checkpoints"
    assert ckpt.load_checkpoint(folder / "last.pt")["step"] == 0  # the good one is intact
    assert not list(folder.glob(".*.tmp"))
    assert all(r.info.status == "FAILED" for r in _runs(tmp_path))


def test_cli_reports_a_full_disk_in_one_line(tmp_path):
    # the CLI prints the message, not a traceback (exit 2)
    from pipeline import run

    def boom(cfg):
        raise ckpt.DiskFullError(errno.ENOSPC, "disk full at /x/last.pt")

    import pipeline.train as T

    orig = T.train
    T.train = boom
    try:
        assert run.main(["train", "epochs=1"]) == 2
    finally:
        T.train = orig


# --------------------------------------------------------------------------------- labels
def test_labels_outside_num_classes_are_refused_before_the_model(tmp_path, phantom_manifest):
    src = Path(phantom_manifest)
    df = pd.read_csv(src)
    df.loc[df["label"] == 1, "label"] = 3
    dst = tmp_path / "relabelled.csv"
    df.to_csv(dst, index=False)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    with pytest.raises(ValueError, match=r"labels 3 \(pneumonia\) outside model.num_classes=2"):
        train(_cfg(dst, tmp_path, "tracking.run_name=a", "model.num_classes=2"))


def test_classify_under_a_reused_name_keeps_its_own_records(tmp_path, phantom_manifest):
    from pipeline.classify import ClassifyConfig, classify

    def once():
        return classify(
            load_config(
                ClassifyConfig,
                None,
                [
                    f"data.manifest={phantom_manifest}",
                    "data.image_size=32",
                    "model.widths=[8,16,16,16]",
                    "epochs=1",
                    "bootstrap=20",
                    "threads=1",
                    f"out_dir={tmp_path / 'cls'}",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                    "tracking.run_name=c",
                ],
            )
        )

    first = once()
    n_first = len((Path(first["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    second = once()
    assert second["run_id"] != first["run_id"]
    # before: the second run appended to the first run's record (and drew both into its curves)
    assert len((Path(second["run_dir"]) / "metrics.jsonl").read_text().splitlines()) == n_first
    assert len(list((tmp_path / "cls").glob("c.replaced-*"))) == 1


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"path,label\na.png,0\n"])
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, content):
    # before: PyTorch's advice to retry with weights_only=False (i.e. to unpickle it)
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=r"not a checkpoint: .*x\.pt") as e:
        ckpt.load_checkpoint(f)
    assert "weights_only" not in str(e.value)
