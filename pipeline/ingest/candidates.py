"""A candidate file of a source (before it is opened), the split names a source may use, and the
path helpers every source shares: printable paths, UTF-8 names, ``resolve()`` that survives loops."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# split folder (or CSV split value) -> split, case-insensitive
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Candidate:
    abs_path: Path
    label_raw: Any = None  # class name, integer, or None (unlabelled)
    split: str | None = None
    patient_id: str | None = None  # final (already pseudonymised where it must be)
    patient_rule: str | None = None
    problem: str | None = None  # a reason to quarantine it, found before decoding


def shown(p: str | Path) -> str:
    """A path (or text) as printable UTF-8: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(str(p)).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_problem(rel: str) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (its bytes are shown as \\xNN): rename the file to ingest it"
    return None


def safe_resolve(p: Path) -> Path:
    """``resolve()`` that survives symlink loops (Python 3.11 raises RuntimeError on them): the
    unresolved path is kept, and reading it later fails with a clear, quarantinable reason."""
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(p))
