"""Which kind of source ingest was given (a folder, with or without a labels table; a ``.npz``; a
CSV), and the candidate files it lists, before any is opened."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ingest.candidates import Candidate, safe_resolve
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.folders import scan_folder
from pipeline.ingest.npz import candidates_from_npz
from pipeline.ingest.tables import Table, candidates_from_csv, label_from_table, read_table


@dataclass
class Sourced:
    """The candidate files a source gave, before any is opened (see :func:`gather`)."""

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


def gather(cfg: IngestConfig, source: Path) -> Sourced:
    """The candidate files of a folder (with an optional labels table), a .npz or a CSV."""
    table_keys = [k for k in ("path_column", "label_column", "patient_column", "finding") if getattr(cfg, k)]
    table: Table | None = None
    if source.is_dir():
        # The root and every file are taken resolved: a symlinked root (a cluster or NAS mount) is
        # fine; what decides "inside the data root" is where a file really is.
        root = safe_resolve(source)
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
