"""Exclusive, crash-safe locks on folders a process writes (a run, a study's records), and the
atomic swap of a finished output folder into place.

Light (no torch): the CLI and the records module use it without loading a framework.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


class RunBusyError(ValueError):
    """Another live process is writing the same run folder."""


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>.lock`` (beside the folder, so the folder itself can be
    moved) for as long as a process writes the run. A second process gets :class:`RunBusyError`
    at once; a killed process's lock goes with it, so a lock that can be taken means no live
    process holds the run."""

    def __init__(
        self,
        run_dir: Any,
        enabled: bool = True,
        what: str = "run folder",
        fix: str = "wait for it to end, or choose another tracking.run_name",
    ) -> None:
        run_dir = Path(run_dir)
        self.path = run_dir.with_name(f".{run_dir.name}.lock")
        self.enabled, self.fd, self.what, self.fix = enabled, None, what, fix

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PermissionError(
                f"output folder {self.path.parent} cannot be created or written: {e}"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunBusyError(
                f"{self.what} {self.path.with_name(self.path.name[1:-5])} is being written by another "
                f"process (pid {holder}): {self.fix}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def swap_into_place(staging: Path, out: Path) -> None:
    """Move the complete folder ``staging`` to ``out``, replacing what ``out`` held: the old
    folder is renamed aside first and removed only once the new one is in place (a failure puts
    it back), so ``out`` is never half-written."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
