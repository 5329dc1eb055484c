"""A study's records: small JSON files meant to be committed with the repository.

A value study (``pipeline.gain``) spans processes, machines and days. Its outcome lives here, not in
the weights or the MLflow store of one machine: one record per classifier child (its config key,
metrics on every test split, optimiser steps, wall time, MLflow run id, per-image test scores) and
per generator (key, steps, wall time, the validation gate's checks, the class fidelity), plus the
study's own config. A study continues from these records anywhere: a child whose record holds the
same key is done.

Every record carries the SHA-256 of what it holds, checked on every read: an edited record (a
changed AUROC or score) refuses the study, naming the file, instead of changing the table. The
digest catches edits and damage, not a forger who recomputes it (it is no signature). Records
hold no absolute paths: a moved or committed folder reads its own files.

Light: no torch, MONAI or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.infra.locks import RunLock
from transforms.manifest import atomic_write_text

SCHEMA = 1
KINDS = ("children", "generators")
STUDY_FILE = "study.json"
# a name becomes a file name: letters, digits and . _ - + only (no separator, no "..")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}")


class RecordError(ValueError):
    """A record that cannot be trusted: damaged, edited, or of another schema."""


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)


def digest(record: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON, without its ``digest`` field."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def _absolute_paths(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _absolute_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj[:50]) for p in _absolute_paths(v, f"{where}[{i}]")]
    if isinstance(obj, str) and (obj.startswith("/") or "=/" in obj or re.match(r"[A-Za-z]:\\", obj)):
        return [f"{where}={obj[:80]}"]
    return []


class StudyRecords:
    """The records folder of one study: ``study.json``, ``children/NAME.json``, ``generators/NAME.json``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def lock(self) -> RunLock:
        """An exclusive lock on the folder for the whole study (a second process is refused at once,
        naming the holder's pid); the lock file lies beside the folder, as ``.NAME.lock``."""
        return RunLock(self.folder, what="study records folder", fix="wait for that study to end")

    def path(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
        if not _NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"record name {name!r} is not a plain name")
        return self.folder / kind / f"{name}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        if path.stat().st_size > 64 * 1024 * 1024:
            raise RecordError(f"{path}: larger than 64 MiB, not a study record")
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecordError(
                f"{path}: not readable JSON ({e}); restore it from git or remove it to redo it"
            ) from None
        if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
            raise RecordError(f"{path}: not a study record of schema {SCHEMA}")
        if rec.get("digest") != digest(rec):
            raise RecordError(
                f"{path}: its contents do not match its digest (edited or damaged after it was written): "
                "restore it from git, or remove it to retrain that item"
            )
        return rec

    def read(self, kind: str, name: str) -> dict[str, Any] | None:
        """The record, checked; None when there is none."""
        return self._read(self.path(kind, name))

    def write(self, kind: str, name: str, record: dict[str, Any]) -> Path:
        return self._write(self.path(kind, name), {**record, "kind": kind, "name": name})

    def _write(self, path: Path, record: dict[str, Any]) -> Path:
        record = {k: v for k, v in record.items() if k != "digest"}
        record["schema"] = SCHEMA
        bad = _absolute_paths(record)
        if bad:
            raise ValueError(f"a study record must hold no absolute path, {path.name} has {bad[:3]}")
        record["digest"] = digest(record)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n")
        return path

    def all(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every record of ``kind``, checked, by name."""
        folder = self.folder / kind
        if not folder.is_dir():
            return {}
        return {p.stem: rec for p in sorted(folder.glob("*.json")) if (rec := self._read(p)) is not None}

    def study(self) -> dict[str, Any] | None:
        return self._read(self.folder / STUDY_FILE)

    def write_study(self, record: dict[str, Any]) -> Path:
        return self._write(self.folder / STUDY_FILE, {**record, "kind": "study"})
