"""One stage runtime: what every stage does around its own work, written once.

A stage's function reads as::

    with runtime.replicas(cfg.data.batch_size) as dinfo:          # torchrun group (or none)
        device = runtime.stage_device(cfg.device, cfg.threads, dinfo)
        with runtime.run_folder(run_dir, dinfo) as old_run_id:     # locked; an old run set aside
            ...build the run...
            with runtime.tracked_run(cfg.tracking, run_dir, "classify", tags, dinfo=dinfo,
                                     old_run_id=old_run_id, params=flatten(to_dict(cfg))) as tracker:
                ...train, test, log...

``replicas`` joins and leaves the process group and checks the batch splits evenly;
``stage_device`` picks the device (a replica's own GPU under torchrun) and the CPU threads;
``run_folder`` holds the folder's lock for the whole run and moves an earlier run under the same
name aside (its MLflow run id is given back, to be marked KILLED if it was left RUNNING);
``tracked_run`` owns the MLflow run's whole life: the tags every run carries (stage, code
version, parent run), the params, the end of an earlier run left RUNNING, and one close with the
status (FINISHED, or FAILED when the body raised). Train, classify, generate and evaluate use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.infra import distributed, engine
from pipeline.infra.locks import RunLock
from pipeline.infra.stage_configs import TrackingConfig
from pipeline.infra.tracking import Tracker


@contextmanager
def replicas(batch_size: int) -> Iterator[distributed.DistInfo]:
    """The torchrun process group for the stage's life (a no-op without torchrun): N replicas
    split every batch, so ``batch_size`` must divide by N. Left on the way out, error or not."""
    dinfo = distributed.init()
    try:
        if batch_size % dinfo.world:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by {dinfo.world} processes")
        yield dinfo
    finally:
        distributed.shutdown(dinfo)


def stage_device(
    name: str, threads: int, dinfo: distributed.DistInfo, cache_allocations: bool = False
) -> torch.device:
    """The device a training stage runs on (a replica's own GPU under torchrun), torch's CPU
    threads set when ``threads`` > 0, and on CPU freed memory kept in the process when asked."""
    device = engine.training_device(name, threads, dinfo)
    if device.type == "cpu" and cache_allocations:
        engine.cache_cpu_allocations()
    return device


def set_aside_earlier(run_dir: Path, dinfo: distributed.DistInfo) -> str | None:
    """Before a fresh run: an earlier run's folder under the same name is moved aside (nothing is
    deleted; a folder that is no run of ours is refused) and its MLflow run id returned, to be
    ended KILLED if it was left RUNNING. Rank 0 alone moves; the others get None."""
    if not dinfo.is_main:
        return None
    old_run_id = engine.previous_run_id(run_dir)
    engine.set_aside(run_dir)
    return old_run_id


@contextmanager
def run_folder(run_dir: Path, dinfo: distributed.DistInfo, fresh: bool = True) -> Iterator[str | None]:
    """Hold ``run_dir``'s lock for the whole run (one process per run folder; rank 0 takes it).
    ``fresh``: the folder starts empty (:func:`set_aside_earlier`; the earlier run's MLflow run id
    is yielded) and is checked writable; else (a run that may resume) None is yielded and the
    stage decides, under the lock."""
    with RunLock(run_dir, enabled=dinfo.is_main):
        old_run_id = set_aside_earlier(run_dir, dinfo) if fresh else None
        if fresh:
            distributed.barrier(dinfo)
            if dinfo.is_main:
                engine.check_writable(run_dir)
        yield old_run_id


def run_tags(stage: str, tcfg: TrackingConfig, code_version: str, **tags: str) -> dict[str, str]:
    """The tags every MLflow run of the project carries: its stage, the code's commit and, inside
    a study, its parent run; then the stage's own."""
    out = {"stage": stage, "git_commit": code_version, **tags}
    if tcfg.parent_run_id:
        out["mlflow.parentRunId"] = tcfg.parent_run_id
    return out


@contextmanager
def tracked_run(
    tcfg: TrackingConfig,
    run_dir: Path,
    tags: dict[str, str],
    *,
    enabled: bool = True,
    run_id: str | None = None,
    old_run_id: str | None = None,
    run_name: str = "",
) -> Iterator[Tracker]:
    """The MLflow run of a stage (see :class:`pipeline.infra.tracking.Tracker`: an unreachable
    server does not stop the stage), from its start (``run_id``: continue that run) to one close
    with the status: FINISHED when the body returns, FAILED when it raises. ``old_run_id``: an
    earlier run under this name, ended KILLED if it was left RUNNING. ``enabled=False`` (replicas
    other than rank 0) makes every call a no-op. ``run_name``: the MLflow run's name (the
    folder's name when empty)."""
    tracker = Tracker(tcfg, run_dir, enabled=enabled)
    status = "FAILED"
    try:
        tracker.start(run_id, run_name or run_dir.name, tags)
        if old_run_id:
            tracker.end_if_running(old_run_id, "KILLED")
        yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)


def sync_batchnorm(
    net: torch.nn.Module, dinfo: distributed.DistInfo, device: torch.device
) -> torch.nn.Module:
    """``net`` with its batch norms synchronised over the replicas (torchrun on GPUs), so each
    normalises with the statistics of the whole global batch; unchanged otherwise."""
    if dinfo.enabled and device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


@dataclass(kw_only=True)
class StageRun:
    """What every training run holds between its steps (torchvision's reference scripts keep
    these as locals of ``main``; here a stage is split into functions that take this object).
    Train and classify add their own (:class:`pipeline.train.TrainRun`,
    :class:`pipeline.classify.ClassifyRun`)."""

    cfg: Any  # the stage's resolved config
    dinfo: distributed.DistInfo
    run_dir: Path
    device: torch.device
    amp: torch.dtype | None
    manifest: Path  # the manifest trained on (a fraction < 1 subset lives in run_dir)
    names: dict[int, str]  # label -> class name
    data: dict[str, Any]  # datasets, loaders, sampler, loader generator, augmentation
    model: torch.nn.Module
    tracker: Tracker | None = None  # made once the run folder is known writable
    code_version: str = "unknown"  # the git commit, tagged on the run and saved in checkpoints
    step: int = 0  # optimiser steps so far
