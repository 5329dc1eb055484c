"""``python -m pipeline.run ingest SOURCE [--out data_manifests/NAME.csv]``.

SOURCE is a folder (Kaggle ``train|val|test/<CLASS>/*`` layout, class sub-folders, or a flat folder
of DICOM/PNG/JPEG/NIfTI files), a MedMNIST-style ``.npz``, or a CSV with ``path,label`` and
optional ``patient_id,split``. Every file is decoded once (so a manifest never lists an image that
cannot be read), hashed on its pixels, and recorded; files that fail go to a quarantine report
with a one-line reason and the rest still ingest.

Splits: the source's ``test`` split is kept as it is. ``val`` is carved from the remaining images
**by patient** (stratified by label), so no patient is in both train and val. A source ``val``
folder is merged into the pool first: the Kaggle copy's ``val`` shares patients with ``train``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import phi
from pipeline.manifest import COLUMNS, SPLITS, atomic_write_text, write_manifest
from transforms.io import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    CXRReadError,
    pixel_hash,
    read_dicom_header,
    read_image,
    redact_values,
    suffix_of,
)

SKIP_SUFFIXES = {".csv", ".json", ".md", ".txt", ".yaml", ".yml", ".py", ".log"}


@dataclass
class IngestConfig:
    source: str = ""
    out: str | None = None  # default: data_manifests/<source name>.csv
    labels: str | None = None  # CSV (path or file name, label) for folders whose labels are not sub-folders
    label_names: list[str] | None = None  # names for integer labels 0, 1, ... (npz / numeric CSV)
    val_fraction: float = 0.1
    seed: int = 0
    min_size: int = 16  # smaller images are quarantined: too small to be a radiograph
    extract_dir: str = "data/extracted"  # where .npz images are written as PNG
    workers: int = 0  # decoding threads; 0 = one per core
    data_root: str = ""  # CSV sources: paths must lie under this folder ("" = the CSV's folder)
    # DICOMs marked BurnedInAnnotation=YES may show a name or MRN in the pixels, which reach MLflow
    # in image grids: they are quarantined unless this is set, and then the manifest is flagged
    allow_burned_in: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")


@dataclass
class Candidate:
    abs_path: Path
    label_raw: Any = None  # class name, integer, or None (unlabelled)
    split: str | None = None
    patient_id: str | None = None


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


# ------------------------------------------------------------------------------------ patient ids
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_KERMANY_IM = re.compile(r"^(.*?IM-\d+)(?:-\d+)+$")
_TRAILING_NUM = re.compile(r"^(.*?)-\d+$")


def patient_from_filename(path: Path) -> str:
    """Kermany naming: ``person1000_bacteria_2931`` -> ``person1000``; ``IM-0115-0001`` -> ``IM-0115``;
    ``NORMAL2-IM-0173-0001-0002`` -> ``NORMAL2-IM-0173``."""
    stem = path.name.split(".")[0]
    m = _PERSON.match(stem)
    if m:
        return m.group(1)
    m = _KERMANY_IM.match(stem)
    if m:
        return m.group(1)
    m = _TRAILING_NUM.match(stem)
    return m.group(1) if m and m.group(1) else stem


# ------------------------------------------------------------------------------------ sources
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


def _safe_resolve(p: Path) -> Path:
    """``resolve()`` that survives symlink loops (Python 3.11 raises RuntimeError on them): the
    unresolved path is kept, and reading it later fails with a clear, quarantinable reason."""
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(p))


def _walk(root: Path) -> tuple[list[Path], int]:
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            # a broken link or loop is kept: the reader quarantines it with the reason
            if _is_candidate_file(p) or (p.is_symlink() and not p.exists()):
                files.append(p)
            elif not name.startswith("."):
                ignored += 1
    return files, ignored


def candidates_from_folder(root: Path, labels_csv: str | None) -> tuple[list[Candidate], int]:
    files, ignored = _walk(root)
    label_map: dict[str, Any] = {}
    if labels_csv:
        lab = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        key = "path" if "path" in lab.columns else "file" if "file" in lab.columns else None
        if key is None or "label" not in lab.columns:
            raise ValueError(f"{labels_csv}: a labels CSV needs columns 'path' (or 'file') and 'label'")
        label_map = dict(zip(lab[key], lab["label"], strict=True))
    out = []
    for p in files:
        rel = p.relative_to(root)
        parts = rel.parts
        split = parts[0].lower() if len(parts) > 1 and parts[0].lower() in SPLITS else None
        class_parts = parts[1:-1] if split else parts[:-1]
        label: Any = None
        if labels_csv:
            label = label_map.get(rel.as_posix(), label_map.get(p.name))
        elif class_parts:
            label = class_parts[0]
        out.append(Candidate(p, label, split))
    return out, ignored


def candidates_from_csv(
    csv_path: Path, data_root: str = ""
) -> tuple[list[Candidate], Path, list[tuple[str, str]]]:
    """Rows of a ``path,label[,patient_id,split]`` CSV. Relative paths are taken from the CSV's
    folder; the data root (the CSV's folder unless ``data_root`` is given) bounds them: a path that
    escapes it is quarantined, never read. A path listed twice is kept once and reported."""
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise ValueError(f"{csv_path}: not a readable CSV ({type(e).__name__}: {e})") from e
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing required column(s) {missing}; need at least path,label")
    base = csv_path.resolve().parent
    root = _safe_resolve(Path(data_root)) if data_root else base
    out, problems, seen = [], [], {}
    for n, r in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        raw = str(r["path"]).strip()
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
        split = (r.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            problems.append((str(p), f"unknown split {split!r} on line {n}; expected one of {SPLITS}"))
            continue
        out.append(Candidate(p, r["label"], split, (r.get("patient_id") or "").strip() or None))
    return out, root, problems


def candidates_from_npz(npz_path: Path, extract_dir: Path) -> tuple[list[Candidate], Path]:
    """Write each array image as a PNG (paths must point at files) and list it with its split."""
    from PIL import Image

    data = np.load(npz_path)
    root = extract_dir / npz_path.stem
    out = []
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in data:
            continue
        imgs, labels = data[ik], data.get(lk)
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(len(imgs)):
            p = root / split / f"{split}_{i:06d}.png"
            if not p.exists():
                img = imgs[i]
                if img.ndim == 3 and img.shape[-1] == 1:
                    img = img[..., 0]
                Image.fromarray(np.asarray(img, dtype=np.uint8)).save(p)
            lab = None if labels is None else int(np.asarray(labels[i]).ravel()[0])
            # MedMNIST carries no patient ids: each image is its own group.
            out.append(Candidate(p, lab, split, f"{npz_path.stem}-{split}-{i:06d}"))
    return out, root


# ------------------------------------------------------------------------------------ labels
def _parse_labels(
    cands: list[Candidate], names: list[str] | None
) -> tuple[dict[int, Any], dict[int, str], dict[int, str]]:
    """Return ``(index -> int label, int label -> name, index -> quarantine reason)``."""
    parsed: dict[int, Any] = {}
    bad: dict[int, str] = {}
    for i, c in enumerate(cands):
        v = c.label_raw
        if v is None:
            parsed[i] = None
            continue
        s = str(v).strip()
        if s == "" or s.lower() in ("nan", "none", "null"):
            bad[i] = f"unreadable label {v!r}: empty"
            continue
        try:
            f = float(s)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z][\w\- ]*", s):
                bad[i] = f"unreadable label {s!r}: neither an integer class nor a class name"
            else:
                parsed[i] = s.lower()
            continue
        if not math.isfinite(f) or f != int(f) or f < 0:
            bad[i] = f"unreadable label {s!r}: integer labels must be whole numbers >= 0"
        else:
            parsed[i] = int(f)
    labelled = {k: v for k, v in parsed.items() if v is not None}
    ints = {v for v in labelled.values() if isinstance(v, int)}
    strs = {v for v in labelled.values() if isinstance(v, str)}
    if ints and strs:
        # Mixed forms: accept names that match label_names, otherwise this is ambiguous.
        lookup = {n.lower(): j for j, n in enumerate(names or [])}
        for k, v in list(labelled.items()):
            if isinstance(v, str):
                if v in lookup:
                    labelled[k] = lookup[v]
                else:
                    bad[k] = f"unreadable label {v!r}: other rows use integer labels"
                    del labelled[k]
        strs = set()
    if strs:
        # 0 = normal by clinical convention when such a class exists; the rest alphabetical
        order = sorted(strs, key=lambda n: (n != "normal", n))
        if names:
            order = [n.lower() for n in names] + [n for n in order if n not in [m.lower() for m in names]]
        index = {n: j for j, n in enumerate(order)}
        name_of = {j: n for n, j in index.items()}
        labelled = {k: index[v] for k, v in labelled.items()}
    else:
        name_of = {
            j: (names[j] if names and j < len(names) else str(j)) for j in sorted(set(labelled.values()))
        }
    result = {i: labelled.get(i, -1) for i in parsed if i not in bad}
    return result, name_of, bad


# ------------------------------------------------------------------------------------ reading
BURNED_IN_REASON = (
    "BurnedInAnnotation=YES (identifying text may be burned into the pixels); "
    "set allow_burned_in=true to ingest it"
)


def _inspect(
    c: Candidate, min_size: int, salt: bytes | None = None, allow_burned_in: bool = False
) -> dict[str, Any]:
    """Decode the file fully: the manifest only lists images that really read. ``salt`` is the
    PHI salt resolved once by the caller (before any thread starts)."""
    arr, info = read_image(c.abs_path)
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
        return e.reason
    return redact_values(f"{type(e).__name__}: {e}")  # no element value in a (shared) report


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


# ------------------------------------------------------------------------------------ stage
def default_out(source: Path) -> Path:
    name = source.stem if source.is_file() else source.name
    return Path("data_manifests") / f"{name}.csv"


def ingest(cfg: IngestConfig) -> IngestResult:
    if not cfg.source:
        raise ValueError("ingest needs a SOURCE (folder, .npz or .csv)")
    source = Path(cfg.source)
    if not source.exists():
        raise FileNotFoundError(f"ingest source {source} does not exist")
    out = Path(cfg.out) if cfg.out else default_out(source)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out}: the manifest must be a .csv file")
    # Check the output location before reading thousands of files, not after.
    out_dir = out.parent if str(out.parent) else Path(".")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out}: {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"--out {out}: directory {out_dir} is not writable")

    ignored = 0
    pre_quarantine: list[tuple[str, str]] = []
    if source.is_dir():
        cands, ignored = candidates_from_folder(source, cfg.labels)
        root = source.resolve()
        kind = "folder"
    elif source.suffix.lower() == ".npz":
        cands, root = candidates_from_npz(source, Path(cfg.extract_dir))
        root = root.resolve()
        kind = "npz"
        cfg.label_names = cfg.label_names or (
            ["normal", "pneumonia"] if "pneumonia" in source.stem.lower() else None
        )
    elif source.suffix.lower() == ".csv":
        cands, root, pre_quarantine = candidates_from_csv(source, cfg.data_root)
        kind = "csv"
    else:
        raise ValueError(f"ingest source {source}: expected a folder, a .npz or a .csv")
    if not cands:
        raise ValueError(f"ingest source {source}: no image files found ({ignored} other files ignored)")

    labels, name_of, bad_labels = _parse_labels(cands, cfg.label_names)
    quarantine: list[tuple[str, str]] = list(pre_quarantine)
    quarantine += [(str(cands[i].abs_path), r) for i, r in sorted(bad_labels.items())]
    # a path outside the data root is refused before it is opened
    outside = {
        i
        for i, c in enumerate(cands)
        if os.path.relpath(c.abs_path, root).startswith("..") and i not in bad_labels
    }
    quarantine += [
        (str(cands[i].abs_path), f"path lies outside the data root {root}") for i in sorted(outside)
    ]
    todo = [i for i in range(len(cands)) if i not in bad_labels and i not in outside]
    # The PHI salt is read or created once, here, before any decoding thread starts: threads that
    # each created it raced (one patient, two pseudonyms; even an empty salt).
    salt = phi.get_salt() if any(_may_be_dicom(cands[i].abs_path) for i in todo) else None

    def work(i: int) -> tuple[int, dict[str, Any] | None, str | None]:
        try:
            return i, _inspect(cands[i], cfg.min_size, salt, cfg.allow_burned_in), None
        except Exception as e:  # any failure quarantines this file; the batch goes on
            return i, None, _one_line(e)

    rows: list[dict[str, Any]] = []
    burned_in: list[str] = []  # manifest paths of allowed BurnedInAnnotation=YES images
    workers = cfg.workers or (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, rec, err in tqdm(
            pool.map(work, todo), total=len(todo), desc="ingest", unit="img", file=sys.stderr
        ):
            c = cands[i]
            if err is not None:
                quarantine.append((str(c.abs_path), err))
                continue
            rel = os.path.relpath(c.abs_path, root)
            pid = c.patient_id or rec.pop("dicom_patient", None) or patient_from_filename(c.abs_path)
            rec.pop("dicom_patient", None)
            if rec.pop("burned_in"):
                burned_in.append(Path(rel).as_posix())
            lab = labels[i]
            rows.append(
                {
                    "path": Path(rel).as_posix(),
                    "label": lab,
                    "label_name": name_of.get(lab, "unlabelled") if lab >= 0 else "unlabelled",
                    "patient_id": pid,
                    "split": c.split or "train",
                    **rec,
                }
            )
    if not rows:
        raise ValueError(f"ingest source {source}: every file failed ({len(quarantine)} quarantined)")
    df = pd.DataFrame(rows)
    df["split"] = carve_val_by_patient(df, cfg.val_fraction, cfg.seed)
    df = df.sort_values(
        ["split", "path"], key=lambda s: s.map({"train": 0, "val": 1, "test": 2}) if s.name == "split" else s
    )
    df = df.reset_index(drop=True)[COLUMNS]

    pats = {s: set(df.loc[df["split"] == s, "patient_id"]) for s in SPLITS}
    dups = _duplicates(df)
    n_groups = int(dups["group"].nunique()) if not dups.empty else 0
    n_cross = int(dups.loc[dups["cross_split"], "group"].nunique()) if not dups.empty else 0
    split_counts = {s: int((df["split"] == s).sum()) for s in SPLITS}

    meta = {
        "source": str(source.resolve()),
        "source_kind": kind,
        "data_root_abs": str(root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": len(df),
        "splits": split_counts,
        "labels": {str(k): v for k, v in sorted(name_of.items())},
        "label_counts": {
            f"{s}/{name_of.get(k, k)}": int(v) for (s, k), v in df.groupby(["split", "label"]).size().items()
        },
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "quarantined": len(quarantine),
        "ignored_files": ignored,
        "duplicate_groups": n_groups,
        "cross_split_duplicate_groups": n_cross,
        "patients": {s: len(p) for s, p in pats.items()},
        "patients_train_val_shared": len(pats["train"] & pats["val"]),
        "patients_train_test_shared": len(pats["train"] & pats["test"]),
        # True when allow_burned_in let BurnedInAnnotation=YES images in: their pixels may show
        # identifying text, so no real-image grid of this manifest may be logged (see
        # manifest.may_hold_burned_in)
        "may_hold_burned_in": bool(burned_in),
        "burned_in_paths": sorted(burned_in),
    }
    write_manifest(out, df, meta)
    qpath = out.with_suffix(".quarantine.csv")
    atomic_write_text(qpath, pd.DataFrame(quarantine, columns=["file", "reason"]).to_csv(index=False))
    dpath = out.with_suffix(".duplicates.csv")
    atomic_write_text(dpath, dups.to_csv(index=False))

    res = IngestResult(
        manifest=out,
        rows=len(df),
        split_counts=split_counts,
        quarantined=quarantine,
        duplicate_groups=n_groups,
        cross_split_duplicate_groups=n_cross,
        ignored=ignored,
        patients_train_val_shared=meta["patients_train_val_shared"],
        patients_train_test_shared=meta["patients_train_test_shared"],
    )
    _report(res, meta, qpath, dpath)
    return res


def _report(res: IngestResult, meta: dict[str, Any], qpath: Path, dpath: Path) -> None:
    print(f"manifest: {res.manifest} ({res.rows} images)")
    print("splits: " + ", ".join(f"{k}={v}" for k, v in res.split_counts.items()))
    print("labels: " + ", ".join(f"{k}={v}" for k, v in meta["label_counts"].items()))
    print(
        f"patients: {meta['patients']}; shared train/val: {res.patients_train_val_shared}; "
        f"shared train/test (source split, kept): {res.patients_train_test_shared}"
    )
    print(
        f"duplicates: {res.duplicate_groups} groups of pixel-identical images, "
        f"{res.cross_split_duplicate_groups} crossing splits -> {dpath}"
    )
    if res.quarantined:
        print(f"quarantined: {len(res.quarantined)} file(s) -> {qpath}", file=sys.stderr)
        for f, reason in res.quarantined[:20]:
            print(f"  {f}: {reason}", file=sys.stderr)
        if len(res.quarantined) > 20:
            print(f"  ... and {len(res.quarantined) - 20} more", file=sys.stderr)
    else:
        print("quarantined: 0 files")
    if res.ignored:
        print(f"ignored: {res.ignored} non-image file(s)")
    if meta.get("may_hold_burned_in"):
        print(
            f"warning: {len(meta['burned_in_paths'])} image(s) marked BurnedInAnnotation=YES were "
            "ingested (allow_burned_in=true): identifying text may be in their pixels; the manifest "
            "is flagged may_hold_burned_in and no real-image grid of it may be logged",
            file=sys.stderr,
        )


def summary_json(res: IngestResult) -> str:
    return json.dumps({"manifest": str(res.manifest), "rows": res.rows, "splits": res.split_counts}, indent=2)
