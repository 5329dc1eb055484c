"""CSV manifests: one row per image, paths relative to a recorded data root.

A manifest ``NAME.csv`` has a sidecar ``NAME.json`` with the data root (stored relative to the
manifest's folder, so a clone elsewhere still resolves it, and absolute as a fallback), the
source, counts, and the duplicate/quarantine summaries, and ``may_hold_burned_in`` (see
:func:`may_hold_burned_in`).

Manifests are opened in spreadsheets, which run a cell that starts with ``=``, ``+``, ``-`` or
``@`` (or a tab or carriage return) as a formula. Text cells that start so are written with a
leading ``'`` (which spreadsheets show as text), and a text cell that itself starts with ``'`` gets
one more; :func:`read_manifest` takes exactly one off again, so every value reads back as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd

COLUMNS = [
    "path",
    "label",
    "label_name",
    "patient_id",
    "split",
    "format",
    "height",
    "width",
    "bits_stored",
    "photometric",
    "transfer_syntax",
    "pixel_hash",
]
REQUIRED = ["path", "label", "split"]
SPLITS = ("train", "val", "test")
# what a manifest may hold: the splits ingest writes, and a held-out test split a study carves
# from the training pool (pipeline.infra.data.carve_split)
MANIFEST_SPLITS = (*SPLITS, "holdout")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: str) -> str:
    """A text cell a spreadsheet shows as text: ``'`` before a formula-like start (or a ``'``)."""
    return "'" + value if value.startswith(FORMULA_STARTS + ("'",)) else value


def unneutralise(value: str) -> str:
    """The value :func:`neutralise` was given."""
    return value[1:] if value.startswith("'") else value


def neutralise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every text cell passed through :func:`neutralise` (numbers stay numbers)."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = [neutralise(v) if isinstance(v, str) else v for v in out[col]]
    return out


def write_csv(path: str | Path, df: pd.DataFrame) -> None:
    """Write ``df`` atomically as UTF-8 CSV with formula-like text cells neutralised."""
    atomic_write_text(path, neutralise_frame(df).to_csv(index=False))


def is_inside(path: str | Path, root: str | Path) -> bool:
    """True when the normalised ``path`` is ``root`` or lies below it (no ``..`` escape)."""
    rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
    return rel != ".." and not rel.startswith(".." + os.sep) and not os.path.isabs(rel)


class ManifestError(ValueError):
    """A manifest that does not exist or cannot be used; the message names the file and the problem."""


def sidecar_path(manifest: str | Path) -> Path:
    return Path(manifest).with_suffix(".json")


def file_mode() -> int:
    """The mode a new file gets from this process's umask (``mkstemp`` always makes 0600 files,
    which a team's shared folder cannot read): 0666 less the umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


@contextmanager
def atomic_writer(
    path: str | Path,
    binary: bool = False,
    fsync: bool = True,
    before_replace: Callable[[], None] | None = None,
) -> Iterator[IO]:
    """The one way files are written: ``with atomic_writer(path) as f: f.write(...)`` writes a
    temp file ``.NAME.*.tmp`` in the same folder (UTF-8 text, or bytes with ``binary``), fsyncs
    it (unless ``fsync=False``: files that are cheap to make again), runs ``before_replace``, and
    renames it over ``path``, so readers never see half a file. The file gets the mode the umask
    gives any new file (:func:`file_mode`). A failure anywhere removes the temp file and leaves
    ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text)


def write_manifest(
    path: str | Path, df: pd.DataFrame, meta: dict[str, Any], extra: tuple[str, ...] = ()
) -> None:
    """Write ``COLUMNS`` (+ ``extra`` columns) and the sidecar; ``meta['data_root_abs']`` is required."""
    path = Path(path)
    write_csv(path, df[COLUMNS + list(extra)])
    data_root = Path(meta["data_root_abs"])
    meta = dict(meta, data_root=os.path.relpath(data_root, path.resolve().parent))
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2, default=str) + "\n")


def resolve_data_root(manifest: str | Path) -> Path:
    """Data root from the sidecar: relative to the manifest first, then the absolute path recorded."""
    manifest = Path(manifest)
    side = sidecar_path(manifest)
    if not side.is_file():
        return manifest.resolve().parent  # a hand-written manifest: paths relative to its own folder
    meta = json.loads(side.read_text())
    rel = (manifest.resolve().parent / meta.get("data_root", ".")).resolve()
    absolute = Path(meta["data_root_abs"]) if meta.get("data_root_abs") else None
    for root in (rel, absolute.resolve() if absolute is not None else None):
        if root is not None and root == Path(root.anchor):  # "/" lets rows point anywhere
            raise ManifestError(
                f"{side}: data root {root} is the file system's root, so its rows could name any file: "
                "point data_root at the folder that holds the images (re-run the ingest stage)"
            )
    if rel.is_dir():
        return rel
    if absolute is not None and absolute.is_dir():
        return absolute
    raise ManifestError(f"{manifest}: data root {rel} (recorded as {absolute}) does not exist")


def may_hold_burned_in(manifest: str | Path) -> bool:
    """True when the manifest was ingested with ``allow_burned_in=true`` and holds images marked
    BurnedInAnnotation=YES: their pixels may show a name or MRN, so no real-image grid (or any
    other picture of its images) may be logged to MLflow. False for a manifest without a sidecar
    or without the flag (hand-written, or ingested before the flag existed)."""
    side = sidecar_path(manifest)
    if not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{side}: unreadable manifest sidecar ({type(e).__name__}: {e})") from e
    return bool(meta.get("may_hold_burned_in", False)) if isinstance(meta, dict) else False


def read_manifest(manifest: str | Path, split: str | None = None) -> tuple[pd.DataFrame, Path]:
    """Load a manifest, check its columns, and add ``abs_path``. Optionally keep one split."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist")
    try:
        df = pd.read_csv(manifest, dtype={"patient_id": str, "label_name": str}, keep_default_na=False)
    except Exception as e:
        raise ManifestError(f"{manifest}: not a readable CSV ({type(e).__name__}: {e})") from e
    for col in df.columns:  # the values as they were before write_csv neutralised them
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = [unneutralise(v) if isinstance(v, str) else v for v in df[col]]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{manifest}: missing required column(s) {missing}")
    bad_split = sorted(set(df["split"]) - set(MANIFEST_SPLITS))
    if bad_split:
        raise ManifestError(f"{manifest}: unknown split value(s) {bad_split}; expected {MANIFEST_SPLITS}")
    root = resolve_data_root(manifest)
    df = df.copy()
    abs_paths = []
    for i, p in enumerate(df["path"]):
        a = Path(os.path.normpath(root / str(p)))
        # a manifest row can never point outside its data root (no ../ or absolute escapes)
        if not is_inside(a, root):
            raise ManifestError(f"{manifest}: row {i + 1} path {p!r} escapes the data root {root}")
        abs_paths.append(str(a))
    df["abs_path"] = abs_paths
    if split is not None:
        if split not in MANIFEST_SPLITS:
            raise ManifestError(f"unknown split '{split}'; expected one of {MANIFEST_SPLITS}")
        df = df[df["split"] == split].reset_index(drop=True)
    return df, root


def label_names(df: pd.DataFrame) -> dict[int, str]:
    """``{label: label_name}`` for the labelled rows of a manifest."""
    if "label_name" not in df.columns:
        return {int(v): str(v) for v in sorted(set(df["label"])) if int(v) >= 0}
    pairs = df[df["label"] >= 0][["label", "label_name"]].drop_duplicates()
    return {int(r.label): str(r.label_name) for r in pairs.itertuples()}
