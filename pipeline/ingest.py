"""``python -m pipeline.run ingest SOURCE [--out data_manifests/NAME.csv] [key=value ...]``.

SOURCE is a folder, a MedMNIST-style ``.npz``, or a CSV with ``path,label`` and optional
``patient_id,split``. Every file is decoded once (so a manifest never lists an image that cannot
be read), hashed on its pixels, and recorded; files that fail go to a quarantine report with a
one-line reason and the rest still ingest, unless more than ``max_quarantined`` of them fail.

Folder layouts (the summary names the one it recognised): split folders (``train|training``,
``val|valid|validation|dev``, ``test|testing``, any case) then class folders, class then split,
class folders alone, split folders alone, flat, or deeper trees (CheXpert, MIMIC-CXR, NIH) whose
labels come from a table (``labels=``). Class folder names are free: a leading number gives the
class index (``0_normal`` -> 0 ``normal``); otherwise ``normal`` is 0 and the rest follow
alphabetically; ``label_names=`` overrides both.

Patient ids: ``patient_pattern=`` if given, else a table's patient column (pseudonymised unless
``clear_patient_ids=true``), else DICOM PatientID (pseudonymised), else the public-set naming
rules of :func:`patient_from_path`.

Splits: the source's ``test`` split is kept as it is. ``val`` is carved from the remaining images
**by patient** (stratified by label), so no patient is in both train and val. A source ``val``
folder is merged into the pool first: the Kaggle copy's ``val`` shares patients with ``train``.

All paths are taken relative to the *resolved* data root, and each file is judged by what it
really is: a symlinked root is fine, a symlink inside it that leads outside is quarantined.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import sys
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.infra.stage_configs import UNCERTAIN, DataConfig, IngestConfig  # noqa: F401 - UNCERTAIN re-exported
from transforms import phi
from transforms.io import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    CXRReadError,
    check_pixels,
    pixel_hash,
    read_dicom_header,
    read_header,
    read_image,
    redact_values,
    suffix_of,
)
from transforms.manifest import COLUMNS, SPLITS, ManifestError, is_inside, write_csv, write_manifest
from transforms.phantoms import ensure_phantom_dataset

SKIP_SUFFIXES = {".csv", ".json", ".md", ".txt", ".yaml", ".yml", ".py", ".log"}
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


class IngestError(ValueError):
    """Ingest ran but its result must not be used: every file failed, or too many did. The
    quarantine report is written; the message names the commonest reasons."""


@dataclass
class Candidate:
    abs_path: Path
    label_raw: Any = None  # class name, integer, or None (unlabelled)
    split: str | None = None
    patient_id: str | None = None  # final (already pseudonymised where it must be)
    patient_rule: str | None = None
    problem: str | None = None  # a reason to quarantine it, found before decoding


@dataclass
class IngestResult:
    manifest: Path
    rows: int
    split_counts: dict[str, int]
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    duplicate_groups: int = 0
    cross_split_duplicate_groups: int = 0
    ignored: int = 0
    patients_train_val_shared: int = 0
    patients_train_test_shared: int = 0
    layout: str = ""  # the source layout recognised, e.g. "split/class folders (SPLIT/CLASS/image)"
    patient_rules: dict[str, int] = field(default_factory=dict)  # rule -> images whose id it gave
    warnings: list[str] = field(default_factory=list)
    decode_peak_bytes: int = 0  # the most estimated decoding memory in flight at once


# ------------------------------------------------------------------------------------ patient ids
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_KERMANY_IM = re.compile(r"^(.*?IM-\d+)(?:-\d+)+$")
_TRAILING_NUM = re.compile(r"^(.*?)-\d+$")
_NIH = re.compile(r"^(\d{8})_\d{3}$")
_CHEXPERT = re.compile(r"(?:^|/)(patient\d+)/study\d+/[^/]+$")
_MIMIC = re.compile(r"(?:^|/)p\d\d/(p\d{6,})/s\d+/[^/]+$")


def _stem(name: str) -> str:
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix in IMAGE_SUFFIXES else name


def patient_from_path(rel: str | Path) -> tuple[str, str]:
    """``(patient id, rule)`` from a path relative to the data root, by public-set naming:

    - ``mimic-cxr``: ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` -> ``p10000032``
    - ``chexpert``: ``train/patient00001/study1/view1_frontal.jpg`` -> ``patient00001``
    - ``nih-cxr14``: ``00000183_001.png`` (patient, follow-up) -> ``00000183``
    - ``kermany``: ``person1000_bacteria_2931.jpeg`` -> ``person1000``; ``IM-0115-0001.jpeg`` ->
      ``IM-0115``; ``NORMAL2-IM-0173-0001-0002.jpeg`` -> ``NORMAL2-IM-0173``
    - ``file name``: the name without its suffix and a trailing ``-NNNN``
      (``phantom-train00012-0001.png`` -> ``phantom-train00012``), else one patient per image.
    """
    posix = Path(rel).as_posix()
    m = _MIMIC.search(posix)
    if m:
        return m.group(1), "mimic-cxr"
    m = _CHEXPERT.search(posix)
    if m:
        return m.group(1), "chexpert"
    stem = _stem(posix.rsplit("/", 1)[-1])
    m = _NIH.match(stem)
    if m:
        return m.group(1), "nih-cxr14"
    m = _PERSON.match(stem) or _KERMANY_IM.match(stem)
    if m:
        return m.group(1), "kermany"
    m = _TRAILING_NUM.match(stem)
    return (m.group(1) if m and m.group(1) else stem), "file name"


def patient_from_filename(path: Path) -> str:
    """The patient id :func:`patient_from_path` gives a bare file name."""
    return patient_from_path(Path(path).name)[0]


# ------------------------------------------------------------------------------------ helpers
def _shown(p: str | Path) -> str:
    """A path (or text) as printable UTF-8: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(str(p)).decode("utf-8", "backslashreplace")


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8_problem(rel: str) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (its bytes are shown as \\xNN): rename the file to ingest it"
    return None


def _safe_resolve(p: Path) -> Path:
    """``resolve()`` that survives symlink loops (Python 3.11 raises RuntimeError on them): the
    unresolved path is kept, and reading it later fails with a clear, quarantinable reason."""
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(p))


def _reason_kind(reason: str) -> str:
    """A reason without its particulars (numbers, quoted values), to count reasons by kind."""
    return re.sub(r"(?<![A-Za-z]-)\d+", "N", re.sub(r"'[^']*'", "'...'", reason))  # UTF-8 stays


def commonest_reasons(quarantine: list[tuple[str, str]], k: int = 5) -> list[tuple[int, str]]:
    counts = Counter(_reason_kind(r) for _, r in quarantine)
    return [(n, kind) for kind, n in counts.most_common(k)]


def _reasons_text(quarantine: list[tuple[str, str]], k: int = 5) -> str:
    return "; ".join(f"{n} x {kind}" for n, kind in commonest_reasons(quarantine, k))


# ------------------------------------------------------------------------------------ folders
def _is_candidate_file(p: Path) -> bool:
    if p.name.startswith(".") or not p.is_file():
        return False
    suffix = suffix_of(p)
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in SKIP_SUFFIXES:
        return False
    if suffix == "":  # DICOM files often carry no suffix: look for the DICM marker
        try:
            with open(p, "rb") as f:
                return f.read(132)[128:132] == b"DICM"
        except OSError:
            return False
    return False


def _walk(root: Path) -> tuple[list[Path], int, list[str]]:
    """Image files under ``root`` (symlinked files included, symlinked folders not followed)."""
    files, ignored, linked_dirs = [], 0, []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                linked_dirs.append(_shown(os.path.relpath(Path(dirpath) / d, root)))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            # a broken link or loop is kept: the reader quarantines it with the reason
            if _is_candidate_file(p) or (p.is_symlink() and not p.exists()):
                files.append(p)
            elif not name.startswith("."):
                ignored += 1
    return files, ignored, sorted(linked_dirs)


_EXPECTED = {
    "split/class": "SPLIT/CLASS/image",
    "class/split": "CLASS/SPLIT/image",
    "class": "CLASS/image",
    "split": "SPLIT/image",
    "flat": "image files directly in the source folder",
    "nested": "deeper folders, no class folders",
}
_LAYOUT_ORDER = ("split/class", "class/split", "class", "split", "flat", "nested")


def _shape(dirs: tuple[str, ...]) -> str:
    if not dirs:
        return "flat"
    first = dirs[0].lower() in SPLIT_ALIASES
    if len(dirs) == 1:
        return "split" if first else "class"
    if len(dirs) == 2:
        if first:
            return "split/class"
        if dirs[1].lower() in SPLIT_ALIASES:
            return "class/split"
    return "nested"


def _split_dir(dirs: tuple[str, ...]) -> str | None:
    """The split folder among the first two levels (``train/...`` or ``CLASS/train/...``)."""
    for d in dirs[:2]:
        if d.lower() in SPLIT_ALIASES:
            return d
    return None


@dataclass
class FolderScan:
    cands: list[Candidate]
    ignored: int
    layout: str
    details: list[str]
    warnings: list[str]


def scan_folder(root: Path, table: Table | None) -> FolderScan:
    """Candidates of a folder source (``root`` resolved), labelled by the layout recognised or by
    ``table``; files that do not fit the layout carry the reason as their ``problem``."""
    files, ignored, linked_dirs = _walk(root)
    rels = [p.relative_to(root) for p in files]
    shapes = [_shape(r.parts[:-1]) for r in rels]
    warnings = []
    if linked_dirs:
        warnings.append(
            f"{len(linked_dirs)} symlinked folder(s) not followed: {', '.join(linked_dirs[:5])}"
            + (" ..." if len(linked_dirs) > 5 else "")
            + " (point SOURCE at the real folder, or give a CSV source listing the files)"
        )
    best = "nested"
    if table is not None:
        layout = f"labels table {table.path.name} (labels matched by path)"
        accepted = set(_EXPECTED)
    else:
        counts = Counter(shapes)
        best = max(_LAYOUT_ORDER, key=lambda s: (counts[s], -_LAYOUT_ORDER.index(s))) if files else "flat"
        layout = f"{best} folders ({_EXPECTED[best]})" if best not in ("flat", "nested") else best
        if best == "flat":
            layout = f"flat ({_EXPECTED['flat']}; unlabelled)"
        elif best == "nested":
            layout = f"nested folders ({_EXPECTED['nested']}; unlabelled: give labels=TABLE to label them)"
        elif best == "split":
            layout = f"split folders ({_EXPECTED['split']}; unlabelled)"
        accepted = (
            {"nested", "flat", "split", "class", "split/class", "class/split"} if best == "nested" else {best}
        )
    cands: list[Candidate] = []
    seen_splits: dict[str, str] = {}
    for p, rel, shape in zip(files, rels, shapes, strict=True):
        dirs = rel.parts[:-1]
        split_dir = _split_dir(dirs)
        split = SPLIT_ALIASES[split_dir.lower()] if split_dir else None
        if split_dir:
            seen_splits[split_dir] = split
        c = Candidate(p, None, split)
        bad_name = _utf8_problem(rel.as_posix())
        if bad_name:  # its folder names are not used either (a class name must print)
            c.problem = bad_name
        elif shape not in accepted:
            c.problem = f"not in the recognised layout {best} (expected {_EXPECTED[best]})"
        elif table is None:
            if shape == "split/class":
                c.label_raw = dirs[1]
            elif shape in ("class/split", "class"):
                c.label_raw = dirs[0]
        cands.append(c)
    details = []
    if seen_splits:
        names = sorted(seen_splits, key=lambda d: (SPLITS.index(seen_splits[d]), d))
        details.append(
            "splits: "
            + ", ".join(d if d == seen_splits[d] else f"{d} -> {seen_splits[d]}" for d in names)
            + (
                " (a source val split is merged into the pool; val is re-carved by patient)"
                if "val" in seen_splits.values()
                else ""
            )
        )
    return FolderScan(cands, ignored, layout, details, warnings)


# ------------------------------------------------------------------------------------ tables
_PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_index", "image_path", "filepath")
_LABEL_COLUMNS = ("label", "labels", "class", "target", "finding_labels")
_PATIENT_COLUMNS = ("patient_id", "patientid", "patient", "subject_id", "subject")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_csv_header(path: Path) -> list[str]:
    """The header row; a column named twice is an error (pandas would rename one silently)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from e
    counts = Counter(h.strip() for h in header if h.strip())
    dup = [c for c, n in counts.items() if n > 1]
    if dup:
        raise ValueError(
            f"{path}: column {dup[0]!r} appears {counts[dup[0]]} times in the header; "
            "rename or remove the extra one so it is clear which to use"
        )
    return header


def _column(df: pd.DataFrame, given: str, aliases: tuple[str, ...], key: str, path: Path) -> str | None:
    if given:
        hits = [c for c in df.columns if c == given] or [c for c in df.columns if _norm(c) == _norm(given)]
        if not hits:
            raise ValueError(
                f"{path}: no column {given!r} ({key}={given}); its columns are {list(df.columns)}"
            )
        return hits[0]
    for a in aliases:
        for c in df.columns:
            if _norm(c) == _norm(a):
                return c
    return None


@dataclass
class Table:
    """A CSV of image rows: paths, labels (or a quarantine reason per row), patients, splits."""

    path: Path
    paths: list[str]
    labels: list[Any]
    label_problems: list[str | None]
    patients: list[str | None]
    splits: list[str]
    patient_column: str | None
    label_source: str
    default_names: list[str] | None = None


def read_table(path: Path, cfg: IngestConfig, need_label: bool = True) -> Table:
    check_csv_header(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable CSV ({type(e).__name__}: {e})") from e
    path_col = _column(df, cfg.path_column, _PATH_COLUMNS, "path_column", path)
    if path_col is None:
        raise ValueError(
            f"{path}: no path column (looked for path, file, filename, Image Index, Path ...); "
            f"its columns are {list(df.columns)}; set path_column=NAME"
        )
    n = len(df)
    labels: list[Any] = [None] * n
    problems: list[str | None] = [None] * n
    default_names = None
    finding = cfg.finding.strip()
    if finding:
        slug = re.sub(r"\W+", "_", finding.lower()).strip("_")
        default_names = [f"no_{slug}", slug]
        own = None if cfg.label_column else _column(df, "", (finding,), "finding", path)
        if own is not None:  # a column per finding: 1 present, 0 absent, -1 uncertain, empty not mentioned
            label_source = f"finding column {own!r}"
            for i, v in enumerate(df[own]):
                s = v.strip()
                try:
                    f = float(s) if s else 0.0
                except ValueError:
                    f = math.nan
                if f in (0.0, 1.0):
                    labels[i] = int(f)
                elif f == -1.0:
                    if cfg.uncertain == "quarantine":
                        problems[i] = (
                            f"uncertain {own} label (-1) in {path.name}; set uncertain=negative or "
                            "uncertain=positive to use such rows"
                        )
                    else:
                        labels[i] = int(cfg.uncertain == "positive")
                else:
                    problems[i] = f"unreadable {own} value {s!r}: expected 1, 0, -1 or empty"
        else:  # a findings column: 'A|B|C'
            col = _column(df, cfg.label_column, _LABEL_COLUMNS, "label_column", path)
            if col is None:
                raise ValueError(
                    f"{path}: finding={finding} names no column, and there is no findings column "
                    f"(Finding Labels, label ...); its columns are {list(df.columns)}; set label_column=NAME"
                )
            label_source = f"finding {finding!r} in column {col!r}"
            want = finding.lower()
            for i, v in enumerate(df[col]):
                tokens = [t.strip().lower() for t in v.split("|") if t.strip()]
                if not tokens:
                    problems[i] = f"empty {col} cell: no findings listed"
                else:
                    labels[i] = int(want in tokens)
    else:
        col = _column(df, cfg.label_column, _LABEL_COLUMNS, "label_column", path)
        if col is None:
            if need_label:
                raise ValueError(
                    f"{path}: no label column (looked for label, labels, class, target, Finding Labels); "
                    f"its columns are {list(df.columns)}; set label_column=NAME, or finding=NAME for "
                    "binary labels from one finding"
                )
            label_source = "none"
        else:
            multi = [v for v in df[col] if "|" in v]
            if multi:
                raise ValueError(
                    f"{path}: label column {col!r} holds multi-label values (e.g. {multi[0]!r}); choose "
                    "one finding for binary labels with finding=NAME"
                )
            label_source = f"column {col!r}"
            labels = list(df[col])
    pcol = _column(df, cfg.patient_column, _PATIENT_COLUMNS, "patient_column", path)
    patients = [v.strip() or None for v in df[pcol]] if pcol else [None] * n
    scol = _column(df, "", ("split",), "split", path)
    splits = [v.strip() for v in df[scol]] if scol else [""] * n
    return Table(
        path, list(df[path_col]), labels, problems, patients, splits, pcol, label_source, default_names
    )


def _suffix_index(paths: list[str]) -> dict[str, list[int]]:
    """Every trailing part of every table path -> its rows, so a file matches a table whether the
    table lists full paths (CheXpert: ``CheXpert-v1.0-small/train/...``) or names (NIH)."""
    index: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        parts = [x for x in p.strip().replace("\\", "/").split("/") if x not in ("", ".")]
        for k in range(len(parts)):
            index["/".join(parts[k:])].append(i)
    return index


def label_from_table(cands: list[Candidate], root: Path, table: Table) -> list[str]:
    """Give each folder candidate its table row (label, patient, split); warnings returned."""
    index = _suffix_index(table.paths)
    used: set[int] = set()
    for c in cands:
        if c.problem:
            continue
        parts = c.abs_path.relative_to(root).parts
        rows: list[int] = []
        k = 0
        for k in range(len(parts)):
            rows = index.get("/".join(parts[k:]), [])
            if rows:
                break
        if not rows:
            c.problem = f"not listed in the labels table {table.path.name}"
            continue
        if len(rows) > 1:
            c.problem = (
                f"matches {len(rows)} rows of {table.path.name} (lines "
                f"{', '.join(str(r + 2) for r in rows[:4])}) by {'/'.join(parts[k:])!r}: ambiguous"
            )
            continue
        r = rows[0]
        used.add(r)
        if table.label_problems[r]:
            c.problem = table.label_problems[r]
            continue
        c.label_raw = table.labels[r]
        if table.patients[r]:
            c.patient_id, c.patient_rule = table.patients[r], f"table column {table.patient_column!r}"
        split = table.splits[r].lower()
        if split:
            if split not in SPLIT_ALIASES:
                c.problem = f"unknown split {split!r} on line {r + 2} of {table.path.name}"
                continue
            c.split = SPLIT_ALIASES[split]
    unused = len(table.paths) - len(used)
    return [f"{unused} row(s) of {table.path.name} match no image file under {root}"] if unused else []


def candidates_from_csv(
    csv_path: Path, data_root: str = "", cfg: IngestConfig | None = None
) -> tuple[list[Candidate], Path, list[tuple[str, str]], Table]:
    """Rows of a ``path,label[,patient_id,split]`` CSV. Relative paths are taken from the CSV's
    folder; the data root (the CSV's folder unless ``data_root`` is given) bounds them: a path that
    escapes it is quarantined, never read. A path listed twice is kept once and reported."""
    cfg = cfg or IngestConfig()
    try:
        table = read_table(csv_path, cfg)
    except ValueError as e:
        if "no path column" in str(e) or "no label column" in str(e):
            raise ValueError(f"{e} (a CSV source needs at least path,label)") from e
        raise
    base = csv_path.resolve().parent
    root = _safe_resolve(Path(data_root)) if data_root else base
    out, problems, seen = [], [], {}
    for i, raw in enumerate(table.paths):
        n = i + 2  # line 1 is the header
        raw = raw.strip()
        if not raw:
            problems.append((f"{csv_path}:{n}", "empty path"))
            continue
        p = Path(raw)
        p = _safe_resolve(p if p.is_absolute() else (base / p))
        if p in seen:
            problems.append(
                (str(p), f"duplicate row: listed again on line {n} of {csv_path.name} (line {seen[p]} kept)")
            )
            continue
        seen[p] = n
        split = table.splits[i].lower() or None
        if split is not None and split not in SPLIT_ALIASES:
            problems.append((str(p), f"unknown split {split!r} on line {n}; expected one of {SPLITS}"))
            continue
        c = Candidate(p, table.labels[i], SPLIT_ALIASES.get(split or ""), problem=table.label_problems[i])
        if table.patients[i]:
            c.patient_id, c.patient_rule = table.patients[i], f"table column {table.patient_column!r}"
        out.append(c)
    return out, root, problems, table


# ------------------------------------------------------------------------------------ npz
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _npz_pixels(npz_path: Path, arrays: dict[str, np.ndarray]) -> tuple[str, float, float]:
    """How the arrays' values become PNG pixels: ``("uint8" | "uint16" | "scaled", lo, hi)``.

    Integers that fit 8 or 16 bits are stored as they are; anything else (negative or wider
    integers, floats) is mapped linearly from the arrays' joint [min, max] to 0..65535. Never
    wrapped, never truncated."""
    kinds = {a.dtype.kind for a in arrays.values()}
    bad = kinds - set("uif")
    if bad:
        dt = next(a.dtype for a in arrays.values() if a.dtype.kind in bad)
        raise ValueError(f"{npz_path}: images of dtype {dt} are not pixel values (need integers or floats)")
    for k, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{npz_path}: {k} holds NaN or Inf values")
    lo = min(float(a.min()) for a in arrays.values() if a.size)
    hi = max(float(a.max()) for a in arrays.values() if a.size)
    if kinds <= set("ui") and lo >= 0 and hi <= 255:
        return "uint8", lo, hi
    if kinds <= set("ui") and lo >= 0 and hi <= 65535:
        return "uint16", lo, hi
    if hi == lo:
        raise ValueError(f"{npz_path}: every image value is {lo}: nothing to learn from")
    return "scaled", lo, hi


def _to_pixels(img: np.ndarray, mode: str, lo: float, hi: float) -> np.ndarray:
    if mode == "uint8":
        return img.astype(np.uint8)
    if mode == "uint16":
        return img.astype(np.uint16)
    return np.round((img.astype(np.float64) - lo) / (hi - lo) * 65535).astype(np.uint16)


def candidates_from_npz(npz_path: Path, extract_dir: Path) -> tuple[list[Candidate], Path, str]:
    """Write each array image as a PNG (paths must point at files) and list it with its split.

    The PNGs go to ``extract_dir/<stem>-<content hash>/``: a different file of the same name never
    reuses them, and the same file does."""
    try:
        data = np.load(npz_path)
    except Exception as e:
        raise ValueError(f"{npz_path}: not a readable .npz ({type(e).__name__}: {e})") from e
    present = [s for s in SPLITS if f"{s}_images" in data]
    if not present:
        raise ValueError(f"{npz_path}: no train_images, val_images or test_images array (has {list(data)})")
    arrays = {f"{s}_images": data[f"{s}_images"] for s in present}
    for k, a in arrays.items():
        if not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] in (1, 3, 4))):
            raise ValueError(f"{npz_path}: {k} has shape {a.shape}; expected (N, H, W) or (N, H, W, 1|3|4)")
    mode, lo, hi = _npz_pixels(npz_path, arrays)
    if mode != "uint8" and any(a.ndim == 4 and a.shape[-1] > 1 for a in arrays.values()):
        raise ValueError(f"{npz_path}: colour images need 8-bit values (0..255); these are {mode}")
    root = extract_dir / f"{npz_path.stem}-{_file_digest(npz_path)}"
    out = []
    for split in present:
        imgs = arrays[f"{split}_images"]
        labels = data.get(f"{split}_labels", None)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim > 1 and int(np.prod(labels.shape[1:])) > 1:
                raise ValueError(
                    f"{npz_path}: {split}_labels has {int(np.prod(labels.shape[1:]))} labels per image "
                    "(multi-label, e.g. ChestMNIST): only one class per image is supported"
                )
            if len(labels) != len(imgs):
                raise ValueError(f"{npz_path}: {len(imgs)} {split} images but {len(labels)} labels")
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(imgs)):
            p = root / split / f"{split}_{i:06d}.png"
            if not p.exists():  # same content hash: an existing PNG is this image
                img = imgs[i]
                if img.ndim == 3 and img.shape[-1] == 1:
                    img = img[..., 0]
                tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
                Image.fromarray(_to_pixels(img, mode, lo, hi)).save(tmp, format="PNG")
                os.replace(tmp, p)
            lab = None if labels is None else int(labels[i].ravel()[0])
            # MedMNIST carries no patient ids: each image is its own group.
            out.append(Candidate(p, lab, split, f"{npz_path.stem}-{split}-{i:06d}", "npz index"))
    note = {
        "uint8": "8-bit values stored as they are",
        "uint16": "16-bit values stored as they are (16-bit PNG)",
        "scaled": f"values mapped linearly from [{lo:g}, {hi:g}] to 0..65535 (16-bit PNG)",
    }[mode]
    return out, root, note


# ------------------------------------------------------------------------------------ labels
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NUMBERED = re.compile(r"^(\d+)[\s_.\-]+(\S.*)$")  # 0_normal, 1-pneumonia, 2 covid
_NAME = re.compile(r"[A-Za-z][\w\- ]*")


@dataclass
class Labels:
    of: dict[int, int]  # candidate index -> label (-1 unlabelled)
    name_of: dict[int, str]
    bad: dict[int, str]  # candidate index -> quarantine reason
    rule: str  # how names became indices


def _raw_labels(cands: list[Candidate], free_names: bool) -> tuple[dict[int, Any], dict[int, str]]:
    """Each candidate's label as read: an int, a plain name, a numbered name ``(N, name)`` or None;
    and the unreadable ones with their reason."""
    parsed: dict[int, Any] = {}  # int | str (plain name) | (int, str) (numbered name)
    bad: dict[int, str] = {}
    for i, c in enumerate(cands):
        v = c.label_raw
        if v is None:
            parsed[i] = None
            continue
        if isinstance(v, (int, np.integer)):
            parsed[i] = int(v)
            continue
        s = str(v).strip()
        if s == "" or s.lower() in ("nan", "none", "null"):
            bad[i] = f"unreadable label {v!r}: empty"
            continue
        if _NUMBER.fullmatch(s):
            f = float(s)
            if not math.isfinite(f) or f != int(f) or f < 0:
                bad[i] = f"unreadable label {s!r}: integer labels must be whole numbers >= 0"
            else:
                parsed[i] = int(f)
            continue
        m = _NUMBERED.match(s)
        if m:
            parsed[i] = (int(m.group(1)), m.group(2).strip().lower())
        elif free_names or _NAME.fullmatch(s):
            parsed[i] = s.lower()
        else:
            bad[i] = f"unreadable label {s!r}: neither an integer class nor a class name"
    return parsed, bad


def _numbered_classes(parsed: dict[int, Any]) -> tuple[dict[int, set[str]], dict[str, int]]:
    """The ``N_name`` classes: index -> names, and name -> index; refuses an index with two names
    or a name with two indices."""
    numbered: dict[int, set[str]] = defaultdict(set)
    for v in parsed.values():
        if isinstance(v, tuple):
            numbered[v[0]].add(v[1])
    for j, ns in numbered.items():
        if len(ns) > 1:
            raise ValueError(f"class index {j} is given to more than one name: {sorted(ns)}")
    index_of_name = {next(iter(ns)): j for j, ns in numbered.items()}
    if len(index_of_name) < len(numbered):
        dup = Counter(next(iter(ns)) for ns in numbered.values()).most_common(1)[0][0]
        raise ValueError(
            f"class name {dup!r} is numbered twice ({sorted(j for j, ns in numbered.items() if dup in ns)})"
        )
    return numbered, index_of_name


def _parse_labels(cands: list[Candidate], names: list[str] | None, free_names: bool = False) -> Labels:
    """Integer labels and their names. ``free_names``: any text is a class name (folder names);
    otherwise a name must start with a letter. ``N_name`` gives class N named ``name``."""
    parsed, bad = _raw_labels(cands, free_names)
    given = [n.lower() for n in names or []]
    numbered, index_of_name = _numbered_classes(parsed)
    plain = {v for v in parsed.values() if isinstance(v, str)}
    if numbered and plain - set(index_of_name):
        shown = ", ".join(f"{j}_{n}" for j, n in sorted((j, n) for n, j in index_of_name.items()))
        raise ValueError(
            f"labels mix numbered classes ({shown}) "
            f"and plain names ({', '.join(sorted(plain - set(index_of_name)))}): name every class "
            "N_name, or none"
        )
    ints = {v for v in parsed.values() if isinstance(v, int)}
    rule = "integer labels"
    labelled: dict[int, int] = {}
    name_of: dict[int, str] = {}
    if numbered:
        rule = "leading numbers of the class names"
        for i, v in parsed.items():
            if isinstance(v, tuple):
                labelled[i] = v[0]
            elif isinstance(v, str):
                labelled[i] = index_of_name[v]
            elif v is not None:
                labelled[i] = v
        name_of = {j: n for n, j in index_of_name.items()}
    elif plain and ints:
        # Mixed forms: accept names that match label_names, otherwise this is ambiguous.
        lookup = {n: j for j, n in enumerate(given)}
        for i, v in parsed.items():
            if isinstance(v, str):
                if v in lookup:
                    labelled[i] = lookup[v]
                else:
                    bad[i] = f"unreadable label {v!r}: other rows use integer labels"
            elif v is not None:
                labelled[i] = v
    elif plain:
        # 0 = normal by clinical convention when such a class exists; the rest alphabetical
        order = sorted(plain, key=lambda n: (n != "normal", n))
        rule = "'normal' first, then alphabetical"
        if given:
            order = given + [n for n in order if n not in given]
            rule = "label_names"
        index = {n: j for j, n in enumerate(order)}
        labelled = {i: index[v] for i, v in parsed.items() if isinstance(v, str)}
        name_of = {j: n for n, j in index.items() if n in plain or n in given}
    else:
        labelled = {i: v for i, v in parsed.items() if v is not None}
    for j in set(labelled.values()):
        if given and j < len(given):
            name_of[j] = given[j]
        name_of.setdefault(j, str(j))
    if given and rule in ("integer labels", "leading numbers of the class names"):
        rule += " (names from label_names)"
    of = {i: labelled.get(i, -1) for i in parsed if i not in bad}
    return Labels(of, name_of, bad, rule)


# ------------------------------------------------------------------------------------ reading
BURNED_IN_REASON = (
    "BurnedInAnnotation=YES (identifying text may be burned into the pixels); "
    "set allow_burned_in=true to ingest it"
)


class DecodeBudget:
    """Bounds the estimated memory of the images being decoded at once (``capacity`` bytes).

    Requests are admitted in arrival order; one larger than the whole budget waits until nothing
    else is decoding and then runs alone, so a few huge files are decoded one at a time instead
    of together. ``peak`` is the most estimated bytes that were in flight at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.in_use = 0
        self.peak = 0
        self._charged = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        n = max(0, int(nbytes))
        charge = min(n, self.capacity)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._charged + charge > self.capacity:
                self._cond.wait()
            self._queue.popleft()
            self._charged += charge
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._charged -= charge
                self.in_use -= n
                self._cond.notify_all()


def _inspect(
    c: Candidate,
    min_size: int,
    salt: bytes | None = None,
    allow_burned_in: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Decode the file fully: the manifest only lists images that really read. ``salt`` is the
    PHI salt resolved once by the caller (before any thread starts)."""
    arr, info = read_image(c.abs_path, max_pixels)
    if min(arr.shape) < min_size:
        raise CXRReadError(
            c.abs_path, f"image is {arr.shape[0]}x{arr.shape[1]} px, smaller than the {min_size} px minimum"
        )
    if float(arr.max()) == float(arr.min()):
        raise CXRReadError(c.abs_path, "image is constant (every pixel the same): nothing to learn from")
    rec = {
        "format": info.format,
        "height": info.height,
        "width": info.width,
        "bits_stored": info.bits_stored,
        "photometric": info.photometric,
        "transfer_syntax": info.transfer_syntax,
        "pixel_hash": pixel_hash(arr),
        "dicom_patient": None,
        "burned_in": False,
    }
    if info.format == "dicom":
        tags = read_dicom_header(c.abs_path, ("PatientID", "StudyInstanceUID", "BurnedInAnnotation"))
        if tags["BurnedInAnnotation"].strip().upper() == "YES":
            if not allow_burned_in:
                raise CXRReadError(c.abs_path, BURNED_IN_REASON)
            rec["burned_in"] = True
        # Identifiers are pseudonymised right here and never stored or printed in clear. The salt
        # is resolved here only for a file that did not look like DICOM (e.g. a .png holding one).
        ident = tags["PatientID"] or tags["StudyInstanceUID"]
        rec["dicom_patient"] = (
            phi.pseudonymise(ident, salt if salt is not None else phi.get_salt()) if ident else None
        )
    return rec


def _one_line(e: BaseException) -> str:
    if isinstance(e, CXRReadError):
        return _printable(e.reason)
    return _printable(redact_values(f"{type(e).__name__}: {e}"))  # no element value in a (shared) report


def _may_be_dicom(p: Path) -> bool:
    """DICOM files carry any suffix or none; these are the ones that are surely something else."""
    return suffix_of(p) not in PIL_SUFFIXES | NIFTI_SUFFIXES


# ------------------------------------------------------------------------------------ splitting
def carve_val_by_patient(df: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """Assign ``val`` to about ``fraction`` of the non-test patients, stratified by label."""
    split = df["split"].copy()
    pool = df[split != "test"]
    if fraction <= 0 or pool.empty:
        return split.where(split == "test", "train")
    rng = np.random.default_rng(seed)
    # a patient's stratum is their most frequent label (ties -> lowest)
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
    val_patients: set[str] = set()
    for _, pats in patient_label.groupby(patient_label):
        names = sorted(pats.index)
        rng.shuffle(names)
        n_val = int(round(len(names) * fraction))
        if len(names) >= 2:
            n_val = min(max(n_val, 1), len(names) - 1)
        val_patients.update(names[:n_val])
    is_val = df["patient_id"].isin(val_patients) & (split != "test")
    return pd.Series(np.where(split == "test", "test", np.where(is_val, "val", "train")), index=df.index)


def _duplicates(df: pd.DataFrame) -> pd.DataFrame:
    groups = df[df.duplicated("pixel_hash", keep=False)].copy()
    if groups.empty:
        return pd.DataFrame(columns=["group", "path", "split", "label", "cross_split"])
    groups["group"] = groups.groupby("pixel_hash").ngroup()
    cross = groups.groupby("group")["split"].transform(lambda s: s.nunique() > 1)
    groups["cross_split"] = cross
    return groups.sort_values(["group", "path"])[["group", "path", "split", "label", "cross_split"]]


def _class_warnings(cands: list[Candidate], labels: Labels, todo: list[int], by_split: bool) -> list[str]:
    present = sorted({labels.of[i] for i in todo if labels.of.get(i, -1) >= 0})
    out = []
    if len(present) == 1:
        name = labels.name_of.get(present[0], str(present[0]))
        out.append(
            f"only one class ({name!r}): every labelled image has label {present[0]}; a classifier "
            "cannot learn from one class (if SOURCE is itself a class folder, point at its parent)"
        )
    elif present and present != list(range(len(present))):
        out.append(f"class indices {present} are not 0..{len(present) - 1}: check the class names' numbers")
    if by_split:
        per: dict[str, set[int]] = defaultdict(set)
        for i in todo:
            if labels.of.get(i, -1) >= 0:
                per[cands[i].split or "train"].add(labels.of[i])
        splits = [s for s in SPLITS if s in per]
        for j in present:
            have = [s for s in splits if j in per[s]]
            lack = [s for s in splits if j not in per[s]]
            if lack:
                out.append(
                    f"classes differ between splits: {labels.name_of.get(j, j)!r} is in "
                    f"{', '.join(have)} but not in {', '.join(lack)}"
                )
    return out


# ------------------------------------------------------------------------------------ stage
def default_out(source: Path) -> Path:
    name = source.stem if source.is_file() else source.name
    return Path("data_manifests") / f"{name}.csv"


@dataclass
class Sourced:
    """The candidate files a source gave, before any is opened (see :func:`_gather`)."""

    cands: list[Candidate]
    root: Path
    kind: str
    layout: str
    ignored: int = 0
    pre_quarantine: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    npz_note: str = ""
    label_names: list[str] | None = None
    by_split: bool = False  # labels come from class folders inside split folders
    free_names: bool = False  # class names come from folder names, not a table


def ingest(cfg: IngestConfig) -> IngestResult:
    """Ingest a folder, .npz or CSV of chest radiographs into a checked CSV manifest."""
    if not cfg.source:
        raise ValueError("ingest needs a SOURCE (folder, .npz or .csv)")
    source = Path(cfg.source)
    if not source.exists():
        raise FileNotFoundError(f"ingest source {source} does not exist")
    out = _check_out(cfg, source)
    src = _gather(cfg, source)
    labels = _parse_labels(src.cands, src.label_names, src.free_names)
    quarantine: list[tuple[str, str]] = [(_shown(f), _printable(r)) for f, r in src.pre_quarantine]
    todo = _screen(cfg, src, labels, quarantine)
    src.warnings += _class_warnings(src.cands, labels, todo, src.by_split)
    salt = _pseudonymise_table_ids(cfg, src.cands, todo)
    budget = DecodeBudget(int(cfg.decode_memory_mb * 2**20))
    rows, rules, burned_in = _decode(cfg, src, labels, todo, salt, budget, quarantine)
    qpath = out.with_suffix(".quarantine.csv")
    write_csv(qpath, pd.DataFrame(quarantine, columns=["file", "reason"]))
    share = _check_quarantined(cfg, source, len(rows), quarantine, qpath)
    df = pd.DataFrame(rows)
    df["split"] = carve_val_by_patient(df, cfg.val_fraction, cfg.seed)
    df = df.sort_values(
        ["split", "path"], key=lambda s: s.map({"train": 0, "val": 1, "test": 2}) if s.name == "split" else s
    )
    df = df.reset_index(drop=True)[COLUMNS]
    dups = _duplicates(df)
    meta = _meta(cfg, source, src, labels, df, dups, rules, burned_in, len(quarantine), share, budget)
    write_manifest(out, df, meta)
    dpath = out.with_suffix(".duplicates.csv")
    write_csv(dpath, dups)
    res = IngestResult(
        manifest=out,
        rows=len(df),
        split_counts=meta["splits"],
        quarantined=quarantine,
        duplicate_groups=meta["duplicate_groups"],
        cross_split_duplicate_groups=meta["cross_split_duplicate_groups"],
        ignored=src.ignored,
        patients_train_val_shared=meta["patients_train_val_shared"],
        patients_train_test_shared=meta["patients_train_test_shared"],
        layout=src.layout,
        patient_rules=dict(rules),
        warnings=src.warnings,
        decode_peak_bytes=budget.peak,
    )
    _report(res, meta, qpath, dpath)
    return res


def _check_out(cfg: IngestConfig, source: Path) -> Path:
    """The manifest path, its folder checked before thousands of files are read, not after."""
    out = Path(cfg.out) if cfg.out else default_out(source)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out}: the manifest must be a .csv file")
    out_dir = out.parent if str(out.parent) else Path(".")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out}: {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"--out {out}: directory {out_dir} is not writable")
    return out


def _gather(cfg: IngestConfig, source: Path) -> Sourced:
    """The candidate files of a folder (with an optional labels table), a .npz or a CSV."""
    table_keys = [k for k in ("path_column", "label_column", "patient_column", "finding") if getattr(cfg, k)]
    table: Table | None = None
    if source.is_dir():
        # The root and every file are taken resolved: a symlinked root (a cluster or NAS mount) is
        # fine; what decides "inside the data root" is where a file really is.
        root = _safe_resolve(source)
        if cfg.labels:
            table = read_table(Path(cfg.labels), cfg)
        elif table_keys:
            raise ValueError(f"{', '.join(table_keys)} apply to a labels table: give labels=TABLE.csv too")
        scan = scan_folder(root, table)
        src = Sourced(scan.cands, root, "folder", scan.layout, scan.ignored, [], scan.warnings, scan.details)
        if table is not None:
            src.warnings += label_from_table(src.cands, root, table)
            src.details.append(f"labels: {table.label_source} of {table.path.name}")
        src.free_names = table is None
        src.by_split = table is None and src.layout.startswith(("split/class", "class/split"))
    elif source.suffix.lower() == ".npz":
        if cfg.labels or table_keys:
            raise ValueError(
                "labels=, finding= and the *_column keys apply to folders and CSV sources, not .npz"
            )
        cands, root, note = candidates_from_npz(source, Path(cfg.extract_dir))
        root = root.resolve()
        src = Sourced(cands, root, "npz", "npz arrays (train|val|test_images, *_labels)", npz_note=note)
        src.details.append(f"npz pixels: {note}; PNGs in {root}")
        if "pneumonia" in source.stem.lower():
            src.label_names = ["normal", "pneumonia"]
    elif source.suffix.lower() == ".csv":
        if cfg.labels:
            raise ValueError("labels= applies to a folder source; a CSV source carries its own labels")
        cands, root, pre_quarantine, table = candidates_from_csv(source, cfg.data_root, cfg)
        src = Sourced(cands, root, "csv", f"CSV source ({table.label_source})", pre_quarantine=pre_quarantine)
    else:
        raise ValueError(f"ingest source {source}: expected a folder, a .npz or a .csv")
    if not src.cands:
        raise ValueError(f"ingest source {source}: no image files found ({src.ignored} other files ignored)")
    src.label_names = cfg.label_names or src.label_names
    if table is not None and table.default_names and not src.label_names:
        src.label_names = table.default_names
    return src


def _screen(cfg: IngestConfig, src: Sourced, labels: Labels, quarantine: list[tuple[str, str]]) -> list[int]:
    """The candidates worth opening (indices); the rest go to ``quarantine`` with their reason: a
    path outside the data root (refused before it is opened), a bad label or name, no patient."""
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    todo: list[int] = []
    for i, c in enumerate(src.cands):
        rel = os.path.relpath(c.abs_path, src.root)
        real = _safe_resolve(c.abs_path)
        if not is_inside(real, src.root):
            how = "symlink leads" if c.abs_path.is_symlink() else "path lies"
            reason = f"{how} outside the data root {src.root}"
        else:
            reason = c.problem or labels.bad.get(i) or _utf8_problem(rel)
        if reason is None and pattern is not None:
            m = pattern.search(Path(rel).as_posix())
            if m is None or not m.group("patient"):
                reason = f"patient_pattern {cfg.patient_pattern!r} does not match this path"
            else:
                c.patient_id, c.patient_rule = m.group("patient"), "patient_pattern"
        if reason is not None:
            quarantine.append((_shown(c.abs_path), _printable(reason)))
        else:
            todo.append(i)
    return todo


def _pseudonymise_table_ids(cfg: IngestConfig, cands: list[Candidate], todo: list[int]) -> bytes | None:
    """The PHI salt, read or created once, here, before any decoding thread starts (threads that
    each created it raced: one patient, two pseudonyms; even an empty salt); table patient ids are
    pseudonymised like DICOM ones unless ``clear_patient_ids``."""
    table_ids = [i for i in todo if (cands[i].patient_rule or "").startswith("table")]
    need_salt = any(_may_be_dicom(cands[i].abs_path) for i in todo) or (
        bool(table_ids) and not cfg.clear_patient_ids
    )
    salt = phi.get_salt() if need_salt else None
    if not cfg.clear_patient_ids:
        for i in table_ids:
            c = cands[i]
            c.patient_id = phi.pseudonymise(c.patient_id, salt)
            c.patient_rule = f"{c.patient_rule} (pseudonymised)"
    return salt


def _decode(
    cfg: IngestConfig,
    src: Sourced,
    labels: Labels,
    todo: list[int],
    salt: bytes | None,
    budget: DecodeBudget,
    quarantine: list[tuple[str, str]],
) -> tuple[list[dict[str, Any]], Counter[str], list[str]]:
    """Open every screened file in a thread pool under a decoded-memory budget; returns the
    manifest rows, how each patient id was found, and the allowed burned-in images' paths. A file
    that fails goes to ``quarantine`` with its reason; the batch goes on."""
    cands = src.cands

    def work(i: int) -> tuple[int, dict[str, Any] | None, str | None]:
        c = cands[i]
        try:
            header = read_header(c.abs_path)
            check_pixels(c.abs_path, header, cfg.max_pixels)  # refused before any decoding
            with budget.hold(header.decode_bytes):
                return i, _inspect(c, cfg.min_size, salt, cfg.allow_burned_in, cfg.max_pixels), None
        except Exception as e:  # any failure quarantines this file; the batch goes on
            return i, None, _one_line(e)

    rows: list[dict[str, Any]] = []
    rules: Counter[str] = Counter()
    burned_in: list[str] = []  # manifest paths of allowed BurnedInAnnotation=YES images
    workers = cfg.workers or (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, rec, err in tqdm(
            pool.map(work, todo), total=len(todo), desc="ingest", unit="img", file=sys.stderr
        ):
            c = cands[i]
            if err is not None:
                quarantine.append((_shown(c.abs_path), err))
                continue
            rel = Path(os.path.relpath(c.abs_path, src.root)).as_posix()
            dicom_patient = rec.pop("dicom_patient", None)
            if c.patient_id:
                pid, rule = c.patient_id, c.patient_rule or "source"
            elif dicom_patient:
                pid, rule = dicom_patient, "DICOM PatientID (pseudonymised)"
            else:
                pid, rule = patient_from_path(rel)
            rules[rule] += 1
            if rec.pop("burned_in"):
                burned_in.append(rel)
            lab = labels.of[i]
            rows.append(
                {
                    "path": rel,
                    "label": lab,
                    "label_name": labels.name_of.get(lab, "unlabelled") if lab >= 0 else "unlabelled",
                    "patient_id": pid,
                    "split": c.split or "train",
                    **rec,
                }
            )
    return rows, rules, burned_in


def _check_quarantined(
    cfg: IngestConfig, source: Path, n_rows: int, quarantine: list[tuple[str, str]], qpath: Path
) -> float:
    """The quarantined share; no manifest when every file, or more than ``max_quarantined``, failed."""
    total = n_rows + len(quarantine)
    if not n_rows:
        raise IngestError(
            f"ingest source {source}: every file failed ({len(quarantine)} quarantined -> {qpath}); "
            f"commonest reasons: {_reasons_text(quarantine)}"
        )
    share = len(quarantine) / total
    if share > cfg.max_quarantined:
        raise IngestError(
            f"ingest source {source}: {len(quarantine)} of {total} files ({share:.0%}) quarantined, more "
            f"than max_quarantined={cfg.max_quarantined:g}; no manifest written. Commonest reasons: "
            f"{_reasons_text(quarantine)}. Every file and its reason: {qpath}. Fix the files, or set "
            f"max_quarantined={math.ceil(share * 100) / 100:g} to accept the rest"
        )
    return share


def _meta(
    cfg: IngestConfig,
    source: Path,
    src: Sourced,
    labels: Labels,
    df: pd.DataFrame,
    dups: pd.DataFrame,
    rules: Counter[str],
    burned_in: list[str],
    n_quarantined: int,
    share: float,
    budget: DecodeBudget,
) -> dict[str, Any]:
    """The manifest's sidecar: where it came from, how it was read, and what it holds."""
    pats = {s: set(df.loc[df["split"] == s, "patient_id"]) for s in SPLITS}
    name_of = labels.name_of
    if name_of:
        src.details.append(
            "classes: "
            + ", ".join(f"{j} {n}" for j, n in sorted(name_of.items()))
            + f" (order: {labels.rule})"
        )
    meta = {
        "source": str(source.resolve()),
        "source_kind": src.kind,
        "layout": src.layout,
        "layout_details": src.details,
        "data_root_abs": str(src.root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": len(df),
        "splits": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "labels": {str(k): v for k, v in sorted(name_of.items())},
        "label_rule": labels.rule,
        "label_counts": {
            f"{s}/{name_of.get(k, 'unlabelled' if k < 0 else k)}": int(v)
            for (s, k), v in df.groupby(["split", "label"]).size().items()
        },
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "quarantined": n_quarantined,
        "quarantined_share": round(share, 4),
        "max_quarantined": cfg.max_quarantined,
        "ignored_files": src.ignored,
        "duplicate_groups": int(dups["group"].nunique()) if not dups.empty else 0,
        "cross_split_duplicate_groups": int(dups.loc[dups["cross_split"], "group"].nunique())
        if not dups.empty
        else 0,
        "patients": {s: len(p) for s, p in pats.items()},
        "patients_total": int(df["patient_id"].nunique()),
        "patient_id_rules": dict(rules.most_common()),
        "images_per_patient": round(len(df) / max(1, df["patient_id"].nunique()), 2),
        "patients_train_val_shared": len(pats["train"] & pats["val"]),
        "patients_train_test_shared": len(pats["train"] & pats["test"]),
        "warnings": src.warnings,
        "max_pixels": cfg.max_pixels,
        "decode_memory_peak_mb": round(budget.peak / 2**20, 1),
        # True when allow_burned_in let BurnedInAnnotation=YES images in: their pixels may show
        # identifying text, so no real-image grid of this manifest may be logged (see
        # manifest.may_hold_burned_in)
        "may_hold_burned_in": bool(burned_in),
        "burned_in_paths": sorted(burned_in),
    }
    if src.npz_note:
        meta["npz_pixels"] = src.npz_note
    return meta


def _report(res: IngestResult, meta: dict[str, Any], qpath: Path, dpath: Path) -> None:
    print(f"manifest: {res.manifest} ({res.rows} images)")
    print(f"layout: {meta['layout']}")
    for line in meta["layout_details"]:
        print(f"  {line}")
    print("splits: " + ", ".join(f"{k}={v}" for k, v in res.split_counts.items()))
    print("labels: " + ", ".join(f"{k}={v}" for k, v in meta["label_counts"].items()))
    rules = ", ".join(f"{rule} {n}" for rule, n in meta["patient_id_rules"].items())
    print(
        f"patients: {meta['patients_total']} ({meta['images_per_patient']:.1f} images per patient on "
        f"average; ids from: {rules}); per split {meta['patients']}; shared train/val: "
        f"{res.patients_train_val_shared}; shared train/test (source split, kept): "
        f"{res.patients_train_test_shared}"
    )
    print(
        f"duplicates: {res.duplicate_groups} groups of pixel-identical images, "
        f"{res.cross_split_duplicate_groups} crossing splits -> {dpath}"
    )
    if res.quarantined:
        print(
            f"quarantined: {len(res.quarantined)} file(s) ({meta['quarantined_share']:.1%}) -> {qpath}",
            file=sys.stderr,
        )
        print("  commonest reasons:", file=sys.stderr)
        for n, kind in commonest_reasons(res.quarantined):
            print(f"    {n} x {kind}", file=sys.stderr)
        for f, reason in res.quarantined[:10]:
            print(f"  {f}: {reason}", file=sys.stderr)
        if len(res.quarantined) > 10:
            print(f"  ... and {len(res.quarantined) - 10} more", file=sys.stderr)
    else:
        print("quarantined: 0 files")
    if res.ignored:
        print(f"ignored: {res.ignored} non-image file(s)")
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if meta.get("may_hold_burned_in"):
        print(
            f"warning: {len(meta['burned_in_paths'])} image(s) marked BurnedInAnnotation=YES were "
            "ingested (allow_burned_in=true): identifying text may be in their pixels; the manifest "
            "is flagged may_hold_burned_in and no real-image grid of it may be logged",
            file=sys.stderr,
        )


# the embedded default data set: train, classify, evaluate and gain run ingest on it when no
# manifest is given
PHANTOM_MANIFEST = "data_manifests/phantoms.csv"


def default_manifest() -> Path:
    """Generate (once) and ingest the embedded phantom data set; return its manifest."""
    manifest = Path(PHANTOM_MANIFEST)
    root = ensure_phantom_dataset()
    stamp = (root / "phantoms.json").read_text()
    side = manifest.with_suffix(".phantoms-stamp")
    if not manifest.is_file() or not side.is_file() or side.read_text() != stamp:
        ingest(IngestConfig(source=str(root), out=str(manifest), val_fraction=0.1))
        side.write_text(stamp)
    return manifest


def resolve_manifest(cfg: DataConfig) -> Path:
    if not cfg.manifest:
        return default_manifest()
    p = Path(cfg.manifest)
    if not p.is_file():
        raise ManifestError(
            f"data.manifest {p} does not exist (run `python -m pipeline.run ingest SOURCE` first)"
        )
    return p
