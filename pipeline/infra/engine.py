"""The training skeleton shared by every stage that trains a network (VAE-GAN, classifier).

One epoch is: seed the epoch, iterate the loader (replaying to the right batch after a mid-epoch
resume), call a stage-specific ``step_fn(batch) -> {name: detached tensor}``, accumulate, sync with
the host and log only every ``log_every`` steps, checkpoint every ``ckpt_every`` steps. The stages
differ only in their step function, their evaluation and what they put into a checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from pipeline.infra import checkpoint as ckpt

StepFn = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available")
    return torch.device(name)


def training_device(name: str, threads: int, dinfo) -> torch.device:
    """The device a training stage runs on: :func:`pick_device`, a replica's own GPU under
    torchrun (``dinfo``: :class:`pipeline.infra.distributed.DistInfo`), and torch's CPU threads
    set when ``threads > 0``."""
    device = pick_device(name)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if threads > 0:
        torch.set_num_threads(threads)
    return device


# glibc mallopt parameters (malloc.h); defaults restored by cache_cpu_allocations(False)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}


def cache_cpu_allocations(enabled: bool = True) -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc only).

    glibc serves every block over 128 KiB-32 MiB with a fresh ``mmap`` and returns it on free, so
    each activation tensor of a CPU training step (tens of MiB at 64 px, batch 64) is page-faulted
    in and zeroed by the kernel again, every step: elementwise layers ran at 5 GB/s instead of 12,
    and the VAE-GAN step took 1.33x longer (benchmarks/bench_train.py). With ``mmap`` off and no
    trimming, the heap keeps its high-water mark, like CUDA's caching allocator does. Returns
    whether the setting was applied (False off glibc).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1} if enabled else _GLIBC_DEFAULTS
    return all(mallopt(k, v) == 1 for k, v in settings.items())


# Below this image size "auto" keeps a GPU VAE-GAN step in float32: it is bound by kernel launches
# there, and autocast's cast kernels cost more than bf16 saves (docs/benchmarks.md, "GPU";
# bench_train --ablate).
AUTO_BF16_MIN_SIZE = 128


def amp_dtype(cfg_amp: str, device: torch.device, image_size: int = 0) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA (from ``AUTO_BF16_MIN_SIZE`` px when the
    caller passes its ``image_size``) and off on CPU; ``bf16``/``fp16`` force one, ``off`` none."""
    if cfg_amp == "off" or (cfg_amp == "auto" and device.type != "cuda"):
        return None
    if cfg_amp == "auto" and 0 < image_size < AUTO_BF16_MIN_SIZE:
        return None
    return torch.float16 if cfg_amp == "fp16" else torch.bfloat16


def seed_epoch(seed: int, epoch: int, loader_generator: torch.Generator, dataset: Any) -> None:
    """Seed data order, augmentation and noise of epoch ``epoch`` from (seed, epoch) alone, so an
    interrupted and resumed run sees exactly what an uninterrupted one does."""
    s = seed * 1000 + epoch
    loader_generator.manual_seed(s)
    tf = getattr(dataset, "transform", None)
    if tf is not None and hasattr(tf, "set_random_state"):
        tf.set_random_state(seed=s)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    torch.manual_seed(s)


@dataclass
class EpochPlan:
    """How one pass over a loader runs (:func:`run_epoch`).

    ``log_fn(metrics, step)`` gets the means of the last ``log_every`` steps; ``ckpt_fn(step,
    batch_in_epoch)`` is called every ``ckpt_every`` steps (not on the last batch: the caller
    checkpoints the epoch end itself); ``skip_batches``/``restore_rng``: a run resumed mid-epoch
    replays the loader to there and restores the RNG state saved with the checkpoint;
    ``max_batches > 0`` ends the epoch after that many batches (a fixed step budget over a larger
    data set); metrics are named ``prefix + name``, those starting with ``hide_in_bar`` are left
    out of the progress bar."""

    desc: str
    log_every: int
    log_fn: Callable[[dict[str, float], int], None] | None = None
    ckpt_fn: Callable[[int, int], None] | None = None
    ckpt_every: int = 0
    skip_batches: int = 0
    restore_rng: dict | None = None
    prefix: str = "train/"
    hide_in_bar: tuple[str, ...] = ()
    max_batches: int = 0


def _progress_bar(total: int, plan: EpochPlan) -> tqdm:
    # a live bar on a terminal; in a log file (no TTY) a line every 30 s instead of every redraw
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=plan.desc,
        unit="batch",
        file=sys.stderr,
        leave=False,
        initial=plan.skip_batches,
        mininterval=0.5 if tty else 30,
        dynamic_ncols=tty,
    )


def run_epoch(loader: Iterable, step_fn: StepFn, step: int, plan: EpochPlan) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` calling ``step_fn`` per batch as ``plan`` says; returns (epoch
    means, new global step)."""
    sums: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}
    n_batches = n_window = 0
    total = len(loader)  # type: ignore[arg-type]
    if plan.max_batches > 0:
        total = min(total, plan.max_batches)
    bar = _progress_bar(total, plan)
    for bi, batch in enumerate(loader):
        if bi >= total:
            break
        if bi < plan.skip_batches:
            continue  # resumed mid-epoch: the loader and augmentations replay to here, no training
        if bi == plan.skip_batches and plan.restore_rng is not None:
            ckpt.set_rng_state(plan.restore_rng)
        losses = step_fn(batch)
        step += 1
        n_batches += 1
        n_window += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v
            window[k] = window.get(k, 0) + v
        # host sync (and a tracking write) only every log_every steps
        if step % plan.log_every == 0 or bi == total - 1:
            metrics = {f"{plan.prefix}{k}": float(v) / n_window for k, v in window.items()}
            if plan.log_fn is not None:
                plan.log_fn(metrics, step)
            bar.set_postfix(
                {
                    k[len(plan.prefix) :]: f"{v:.3f}"
                    for k, v in metrics.items()
                    if not k[len(plan.prefix) :].startswith(plan.hide_in_bar)
                }
            )
            window, n_window = {}, 0
        bar.update(1)
        if (
            plan.ckpt_fn is not None
            and plan.ckpt_every > 0
            and step % plan.ckpt_every == 0
            and bi < total - 1
        ):
            plan.ckpt_fn(step, bi + 1)
    bar.close()
    return {k: float(v) / max(n_batches, 1) for k, v in sums.items()}, step


def find_resume(resume: str, run_dir: Any) -> Any:
    """``""`` -> None; ``auto`` -> this run's own ``run_dir/checkpoints/last.pt`` (or the previous
    checkpoint kept beside it; None when neither exists: a fresh start); else the path.

    ``auto`` never picks another run's checkpoint: the run is the one named by
    ``tracking.run_name`` (``run_folder``)."""
    from pathlib import Path

    if not resume:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.pt"
        return last if last.is_file() or ckpt.previous_path(last).is_file() else None
    p = Path(resume)
    if not p.is_file() and not ckpt.previous_path(p).is_file():
        raise ckpt.CheckpointError(f"resume={p}: checkpoint does not exist")
    return p


def run_folder(out_dir: str, run_name: str, resume: str, default_name: str) -> Any:
    """The folder a run writes: ``resume=PATH`` continues the run that checkpoint belongs to;
    otherwise ``out_dir/run_name``. ``resume=auto`` needs the name (it continues that run only)."""
    from pathlib import Path

    if resume and resume != "auto":
        return Path(resume).resolve().parent.parent
    if resume == "auto" and not run_name:
        raise ValueError(
            "resume=auto continues the run named by tracking.run_name: set tracking.run_name=NAME "
            "(or resume=PATH/TO/last.pt)"
        )
    return Path(out_dir) / (run_name or default_name)


def previous_run_id(run_dir: Any) -> str | None:
    """The MLflow run id recorded in a run folder: its run-id file, else its tracking outbox, else
    (older folders) its checkpoints. The cheap records first: a checkpoint load reads every weight."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    with contextlib.suppress(OSError):
        rid = (run_dir / ckpt.RUN_ID_FILE).read_text().strip()
        if rid:  # empty: the run marker of a run the server has not seen yet (tracking.Tracker.start)
            return rid
    with contextlib.suppress(OSError, ValueError, AttributeError):
        rid = json.loads((run_dir / "tracking_outbox" / "state.json").read_text()).get("run_id")
        if rid:
            return str(rid)
    last = run_dir / "checkpoints" / "last.pt"
    for p in (last, ckpt.previous_path(last), run_dir / "classifier.pt"):
        with contextlib.suppress(ckpt.CheckpointError):
            if p.is_file():
                rid = ckpt.load_checkpoint(p).get("mlflow_run_id")
                if rid:
                    return str(rid)
    return None


def is_run_folder(folder: Any) -> bool:
    """Whether ``folder`` is a run folder this project wrote: it carries the run marker
    (``ckpt.RUN_ID_FILE``, written by every run's ``tracking.Tracker.start``, empty until the
    server has seen the run) or, in folders of runs that never reached the server before the
    marker was written at start, a tracking outbox."""
    from pathlib import Path

    folder = Path(folder)
    return (folder / ckpt.RUN_ID_FILE).is_file() or (folder / "tracking_outbox" / "state.json").is_file()


def set_aside(run_dir: Any) -> Any:
    """Move an earlier run's folder out of the way (``NAME.replaced-STAMP``) so that a fresh run
    under the same name never mixes the old run's metrics, grids or outbox into its own; nothing
    is deleted. Returns the new place, or None when there was nothing to move (no folder, or one
    holding no file: it is used as it is).

    Only a run folder (:func:`is_run_folder`) is moved: any other folder with files in it is
    refused (``FileExistsError`` naming it), never moved, whatever name led here."""
    import time
    from pathlib import Path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    if not is_run_folder(run_dir):
        # empty sub-folders only (a run that died before it started tracking): nothing to keep
        if not any(p.is_symlink() or not p.is_dir() for p in run_dir.rglob("*")):
            return None
        raise FileExistsError(
            f"{run_dir} exists and is not a run folder of this pipeline (no {ckpt.RUN_ID_FILE} in it): "
            "it is left as it is. Choose another tracking.run_name (or out_dir), or move that folder "
            "away yourself"
        )
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    run_dir.rename(dest)
    print(f"an earlier run named {run_dir.name} was moved to {dest} (a fresh run starts)", file=sys.stderr)
    return dest


def check_writable(path: Any, need_bytes: int = 0) -> None:
    """Report a read-only or full output folder before training starts, not after the first epoch.

    ``need_bytes``: what the run will write at least (checkpoints are written beside the old one
    and then renamed over it, so twice their size); less free space than that is an error too.
    """
    import errno
    import shutil
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"output folder {path} cannot be created: {e}") from e
    probe = path / ".write-probe"
    try:
        probe.write_bytes(b"0" * 4096)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PermissionError(f"output folder {path} is full: {e}") from e
        raise PermissionError(f"output folder {path} is not writable: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise PermissionError(
            f"output folder {path} has {free / 2**20:.1f} MiB free; this run needs at least "
            f"{need_bytes / 2**20:.1f} MiB for its checkpoints and grids"
        )


def state_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the modules' parameters and buffers (a checkpoint holds them, plus Adam's two
    moments per parameter)."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


class RollbackNeeded(RuntimeError):
    """Raised inside an epoch after too many consecutive non-finite steps."""


class DivergenceError(RuntimeError):
    """Training kept diverging after the allowed number of rollbacks."""


class DivergenceGuard:
    """Skip steps whose losses or gradient norms are NaN/Inf; after ``max_bad_steps`` consecutive
    bad steps ask for a rollback to the last good checkpoint (with a lower learning rate); after
    ``max_rollbacks`` rollbacks give up with a clear error.

    The check costs one host sync per step (a single boolean), which at these step times is noise.
    """

    def __init__(self, max_bad_steps: int = 3, max_rollbacks: int = 3, lr_factor: float = 0.5) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be >= 0, got {max_rollbacks}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        self.max_bad_steps, self.max_rollbacks, self.lr_factor = max_bad_steps, max_rollbacks, lr_factor
        self.skipped = 0
        self.consecutive = 0
        self.rollbacks = 0

    def ok(self, *tensors: torch.Tensor) -> bool:
        """True if every tensor is finite; otherwise count a bad step (and maybe ask for a rollback)."""
        finite = bool(torch.stack([t.detach().float().reshape(()) for t in tensors]).isfinite().all())
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_bad_steps:
            self.consecutive = 0
            raise RollbackNeeded(f"{self.max_bad_steps} consecutive non-finite steps")
        return False

    def rollback(self) -> float:
        """Count a rollback; return the factor to multiply the learning rates by, or raise."""
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise DivergenceError(
                f"training diverged: non-finite losses or gradients persisted after {self.max_rollbacks} "
                f"rollback(s) with the learning rate lowered by {self.lr_factor} each time "
                f"({self.skipped} steps skipped in all); lower optim.lr or check the data"
            )
        return self.lr_factor**self.rollbacks

    def state(self) -> dict[str, int]:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks}


def log_skipped(tracker, skipped: list[tuple[str, str]]) -> None:
    """Record on the run the images a stage skipped because they could not be read (count as a
    param, files and reasons as ``skipped_images.json``)."""
    if skipped:
        tracker.log_params({"data.skipped_images": len(skipped)})
        tracker.log_dict(
            {"skipped": [{"file": f, "reason": why} for f, why in skipped]}, "skipped_images.json"
        )
