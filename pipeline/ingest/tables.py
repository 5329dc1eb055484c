"""CSV tables: a labels table beside a folder (NIH, CheXpert) and a CSV source listing images
(``path,label[,patient_id,split]``). Columns are found by name or alias, labels read as classes or
as one finding (``finding=``), and each folder file is matched to its table row by path."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.ingest.candidates import SPLIT_ALIASES, Candidate, safe_resolve
from pipeline.ingest.config import IngestConfig
from transforms.manifest import SPLITS

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


@dataclass
class _LabelColumn:
    """A table's labels as read: one value (or None) and one quarantine reason (or None) per row."""

    labels: list[Any]
    problems: list[str | None]
    source: str  # where they came from, for the summary
    default_names: list[str] | None = None


def _finding_column(values: pd.Series, own: str, path: Path, uncertain: str) -> _LabelColumn:
    """A column per finding: 1 present, 0 absent, -1 uncertain, empty not mentioned."""
    out = _LabelColumn([None] * len(values), [None] * len(values), f"finding column {own!r}")
    for i, v in enumerate(values):
        s = v.strip()
        try:
            f = float(s) if s else 0.0
        except ValueError:
            f = math.nan
        if f in (0.0, 1.0):
            out.labels[i] = int(f)
        elif f == -1.0:
            if uncertain == "quarantine":
                out.problems[i] = (
                    f"uncertain {own} label (-1) in {path.name}; set uncertain=negative or "
                    "uncertain=positive to use such rows"
                )
            else:
                out.labels[i] = int(uncertain == "positive")
        else:
            out.problems[i] = f"unreadable {own} value {s!r}: expected 1, 0, -1 or empty"
    return out


def _finding_labels(df: pd.DataFrame, path: Path, cfg: IngestConfig) -> _LabelColumn:
    """Binary labels for ``cfg.finding``: from its own column, or from a findings column ``A|B|C``."""
    finding = cfg.finding.strip()
    slug = re.sub(r"\W+", "_", finding.lower()).strip("_")
    own = None if cfg.label_column else _column(df, "", (finding,), "finding", path)
    if own is not None:
        out = _finding_column(df[own], own, path, cfg.uncertain)
    else:
        col = _column(df, cfg.label_column, _LABEL_COLUMNS, "label_column", path)
        if col is None:
            raise ValueError(
                f"{path}: finding={finding} names no column, and there is no findings column "
                f"(Finding Labels, label ...); its columns are {list(df.columns)}; set label_column=NAME"
            )
        out = _LabelColumn([None] * len(df), [None] * len(df), f"finding {finding!r} in column {col!r}")
        want = finding.lower()
        for i, v in enumerate(df[col]):
            tokens = [t.strip().lower() for t in v.split("|") if t.strip()]
            if not tokens:
                out.problems[i] = f"empty {col} cell: no findings listed"
            else:
                out.labels[i] = int(want in tokens)
    out.default_names = [f"no_{slug}", slug]
    return out


def _class_labels(df: pd.DataFrame, path: Path, cfg: IngestConfig, need_label: bool) -> _LabelColumn:
    """One class per row, from the label column (none: unlabelled, where ``need_label`` allows)."""
    col = _column(df, cfg.label_column, _LABEL_COLUMNS, "label_column", path)
    if col is None:
        if need_label:
            raise ValueError(
                f"{path}: no label column (looked for label, labels, class, target, Finding Labels); "
                f"its columns are {list(df.columns)}; set label_column=NAME, or finding=NAME for "
                "binary labels from one finding"
            )
        return _LabelColumn([None] * len(df), [None] * len(df), "none")
    multi = [v for v in df[col] if "|" in v]
    if multi:
        raise ValueError(
            f"{path}: label column {col!r} holds multi-label values (e.g. {multi[0]!r}); choose "
            "one finding for binary labels with finding=NAME"
        )
    return _LabelColumn(list(df[col]), [None] * len(df), f"column {col!r}")


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
    if cfg.finding.strip():
        lab = _finding_labels(df, path, cfg)
    else:
        lab = _class_labels(df, path, cfg, need_label)
    n = len(df)
    pcol = _column(df, cfg.patient_column, _PATIENT_COLUMNS, "patient_column", path)
    patients = [v.strip() or None for v in df[pcol]] if pcol else [None] * n
    scol = _column(df, "", ("split",), "split", path)
    splits = [v.strip() for v in df[scol]] if scol else [""] * n
    return Table(
        path,
        list(df[path_col]),
        lab.labels,
        lab.problems,
        patients,
        splits,
        pcol,
        lab.source,
        lab.default_names,
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
    root = safe_resolve(Path(data_root)) if data_root else base
    out, problems, seen = [], [], {}
    for i, raw in enumerate(table.paths):
        n = i + 2  # line 1 is the header
        raw = raw.strip()
        if not raw:
            problems.append((f"{csv_path}:{n}", "empty path"))
            continue
        p = Path(raw)
        p = safe_resolve(p if p.is_absolute() else (base / p))
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
