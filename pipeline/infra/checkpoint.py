"""Checkpoints: atomic writes, everything needed to resume, loaded with ``weights_only=True``."""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.infra.config import MISSING, diff_flat, flatten
from transforms.manifest import atomic_writer

# the file in which a run folder names its MLflow run (written by tracking.Tracker as soon as the
# run exists, read by engine.previous_run_id)
RUN_ID_FILE = ".mlflow_run_id"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and the mismatch."""


def rng_state() -> dict[str, Any]:
    # numpy's state holds an ndarray, which weights_only loading refuses: store it as a tensor
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DiskFullError(OSError):
    """A write that failed for lack of space; the message names the file ("disk full at PATH")."""


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint`` keeps the checkpoint it replaced: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class _RecordingWriter:
    """The file object ``torch.save`` writes through, keeping the ``OSError`` of a failed write:
    torch turns it into ``RuntimeError("... unexpected pos N vs M")`` (or "file write failed") and
    drops its errno, which says whether the disk is full."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    # a RuntimeError from torch.save whose write error was not seen: its text is all there is
    try:
        failed_write = "write failed" in str(err) or "unexpected pos" in str(err)
        return failed_write and shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def save_checkpoint(path: str | Path, payload: dict[str, Any], keep_previous: bool = True) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file.

    With ``keep_previous`` the checkpoint being replaced is kept as ``previous_path(path)`` (a
    hard link to it, renamed into place), so a newest checkpoint that is damaged later still leaves
    a good one to resume from (:func:`load_resumable`); ``path`` itself is replaced by one atomic
    rename and exists at every moment, whenever the process is killed. A failed write removes its
    temp files; out of space, it raises :class:`DiskFullError` naming ``path`` (the checkpoints
    already there are intact)."""
    path = Path(path)

    def keep_the_replaced() -> None:
        if keep_previous and path.is_file():
            keep_copy(path, previous_path(path))

    writer = None
    try:
        with atomic_writer(path, binary=True, before_replace=keep_the_replaced) as f:
            writer = _RecordingWriter(f)
            torch.save(payload, writer)
    except BaseException as e:
        seen = writer.error if writer is not None and isinstance(e, RuntimeError) else None
        if seen is not None and seen.errno not in DISK_FULL_ERRNOS:
            # another write error torch reported as "unexpected pos": say which, and where
            raise OSError(seen.errno, f"writing checkpoint {path} failed: {seen.strerror or seen}") from e
        if seen is not None or (isinstance(e, (OSError, RuntimeError)) and _is_disk_full(e, path.parent)):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full at {path}: free space in {path.parent} and continue with resume=auto "
                f"(the checkpoints already there are intact)",
            ) from e
        raise
    return path


def keep_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (a hard link where the file system has them), swapped in
    atomically; ``src`` is not touched."""
    fd, tmp = tempfile.mkstemp(dir=src.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems): a real copy
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes killed half-way (``.NAME.*.tmp``)."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise CheckpointError(f"not a checkpoint: {path} (it holds something other than tensors)") from e
        raise CheckpointError(f"not a checkpoint: {path} ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"not a checkpoint: {path} (a {type(payload).__name__}, not a dict)")
    return payload


def load_resumable(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The checkpoint at ``path``, or, when that one is damaged or missing, the previous one kept
    beside it (with a warning). Returns the payload and the file it came from."""
    path = Path(path)
    try:
        return load_checkpoint(path), path
    except CheckpointError as e:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        print(f"WARNING: {e}; resuming from the previous checkpoint {prev}", file=sys.stderr, flush=True)
        try:
            return load_checkpoint(prev), prev
        except CheckpointError as e2:
            raise CheckpointError(f"{e}; the previous one is unusable too: {e2}") from e2


def config_diff(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: checkpoint X, now Y`` for every flattened key both configs have and that differs."""
    return [
        f"{k}: checkpoint {a!r}, now {b!r}"
        for k, a, b in diff_flat(flatten(saved), flatten(now))
        if k not in ignore and a is not MISSING and b is not MISSING
    ]


def inference_state(payload: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The ``encoder``/``decoder`` weights inference uses: the averaged ones when the run kept an
    average (``model.ema_decay > 0``), else the last step's."""
    return (payload.get("ema") or {}).get(name) or payload["models"][name]


def load_module_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: str | Path
) -> None:
    """``load_state_dict`` with a message that names the checkpoint and the mismatched tensors.

    A module with an ``upgrade_state_dict(state)`` method first translates checkpoints written by
    older versions of its code (see ``networks.vaegan.upgrade_state_dict``)."""
    upgrade = getattr(module, "upgrade_state_dict", None)
    if upgrade is not None:
        state = upgrade(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatch " + "; ".join(shape[:3]))
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {path} does not fit the configured {name}: " + ", ".join(parts))
    check_finite(state, name, f"checkpoint {path}")
    module.load_state_dict(state)


def check_finite(
    state: dict[str, Any],
    name: str,
    where: str,
    fix: str = "use an earlier checkpoint (the .prev.pt kept beside it, or an earlier run) or retrain",
) -> None:
    """Refuse weights holding NaN or Inf (a diverged run, a damaged or tampered file): they would
    make black images, a FD that ``sqrtm`` cannot compute and NaN predictions, all without an
    error. ``where`` names the file or model URI, ``fix`` what to load instead. Every model load
    passes here: :func:`load_module_state` and ``model_store.load_generator_uri``."""
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v).all())
    ]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{where}: the {name} weights hold NaN or Inf values ({', '.join(bad[:3])}{more}): a diverged "
            f"or damaged model that would generate or predict garbage; {fix}"
        )


def load_optimizer_state(
    opt: torch.optim.Optimizer,
    opt_state: dict[str, Any],
    module: torch.nn.Module,
    module_state: dict[str, Any],
) -> None:
    """``opt.load_state_dict`` that survives parameters the module's code no longer has.

    ``module_state`` is the module's state dict as saved beside ``opt_state`` (its parameter order
    is the optimiser's). Parameters that ``upgrade_state_dict`` drops lose their optimiser state;
    every other parameter keeps its own, matched by name rather than by position.
    """
    own_params = [n for n, p in module.named_parameters() if p.requires_grad]
    n_saved = sum(len(g["params"]) for g in opt_state["param_groups"])
    if n_saved == len(own_params):
        opt.load_state_dict(opt_state)
        return
    upgrade = getattr(module, "upgrade_state_dict", None)
    kept = set(upgrade(module_state)) if upgrade is not None else set(module_state)
    dropped = [k for k in module_state if k not in kept]
    old_params = [k for k in module_state if k in own_params or k in dropped]
    if len(old_params) != n_saved or len(opt_state["param_groups"]) != 1:
        raise CheckpointError(
            f"optimiser state has {n_saved} parameters, the module {len(own_params)}: cannot match them"
        )
    new_index = {name: i for i, name in enumerate(own_params)}
    remap = {i: new_index[name] for i, name in enumerate(old_params) if name in new_index}
    group = dict(opt_state["param_groups"][0], params=list(range(len(own_params))))
    state = {remap[int(i)]: v for i, v in opt_state["state"].items() if int(i) in remap}
    opt.load_state_dict({"state": state, "param_groups": [group]})
