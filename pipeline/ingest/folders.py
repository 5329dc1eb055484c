"""Folder sources: the image files under a folder, and the layout they are in (split and class
folders in either order, class folders, split folders, flat, or deeper trees labelled by a table)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.ingest.candidates import SPLIT_ALIASES, Candidate, shown, utf8_problem
from pipeline.ingest.tables import Table
from transforms.io import IMAGE_SUFFIXES, suffix_of
from transforms.manifest import SPLITS

SKIP_SUFFIXES = {".csv", ".json", ".md", ".txt", ".yaml", ".yml", ".py", ".log"}


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
                linked_dirs.append(shown(os.path.relpath(Path(dirpath) / d, root)))
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


def _linked_warnings(linked_dirs: list[str]) -> list[str]:
    if not linked_dirs:
        return []
    return [
        f"{len(linked_dirs)} symlinked folder(s) not followed: {', '.join(linked_dirs[:5])}"
        + (" ..." if len(linked_dirs) > 5 else "")
        + " (point SOURCE at the real folder, or give a CSV source listing the files)"
    ]


def _layout(shapes: list[str], table: Table | None) -> tuple[str, str, set[str]]:
    """``(layout as shown, best shape, shapes accepted)``: the table's, or the commonest shape's."""
    best = "nested"
    if table is not None:
        return f"labels table {table.path.name} (labels matched by path)", best, set(_EXPECTED)
    counts = Counter(shapes)
    best = max(_LAYOUT_ORDER, key=lambda s: (counts[s], -_LAYOUT_ORDER.index(s))) if shapes else "flat"
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
    return layout, best, accepted


def _splits_detail(seen_splits: dict[str, str]) -> list[str]:
    """The split folders found and the split each stands for, as a line of the summary."""
    if not seen_splits:
        return []
    names = sorted(seen_splits, key=lambda d: (SPLITS.index(seen_splits[d]), d))
    return [
        "splits: "
        + ", ".join(d if d == seen_splits[d] else f"{d} -> {seen_splits[d]}" for d in names)
        + (
            " (a source val split is merged into the pool; val is re-carved by patient)"
            if "val" in seen_splits.values()
            else ""
        )
    ]


def scan_folder(root: Path, table: Table | None) -> FolderScan:
    """Candidates of a folder source (``root`` resolved), labelled by the layout recognised or by
    ``table``; files that do not fit the layout carry the reason as their ``problem``."""
    files, ignored, linked_dirs = _walk(root)
    rels = [p.relative_to(root) for p in files]
    shapes = [_shape(r.parts[:-1]) for r in rels]
    layout, best, accepted = _layout(shapes, table)
    cands: list[Candidate] = []
    seen_splits: dict[str, str] = {}
    for p, rel, shape in zip(files, rels, shapes, strict=True):
        dirs = rel.parts[:-1]
        split_dir = _split_dir(dirs)
        split = SPLIT_ALIASES[split_dir.lower()] if split_dir else None
        if split_dir:
            seen_splits[split_dir] = split
        c = Candidate(p, None, split)
        bad_name = utf8_problem(rel.as_posix())
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
    return FolderScan(cands, ignored, layout, _splits_detail(seen_splits), _linked_warnings(linked_dirs))
