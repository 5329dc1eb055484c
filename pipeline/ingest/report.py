"""What an ingest run found, told twice: the manifest's sidecar (where the data came from, how it
was read, what the manifest holds) and the summary printed at the end, with the commonest reasons
files were quarantined."""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.ingest.config import IngestConfig
from pipeline.ingest.decode import DecodeBudget
from pipeline.ingest.labels import Labels
from pipeline.ingest.sources import Sourced
from transforms.manifest import SPLITS


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


@dataclass
class Ingested:
    """One run's reading of its source, for the sidecar: the config, what the source gave, the
    labels, the decoding budget, how patient ids were found, and what was quarantined."""

    cfg: IngestConfig
    source: Path
    src: Sourced
    labels: Labels
    budget: DecodeBudget
    rules: Counter[str]
    burned_in: list[str]  # manifest paths of allowed BurnedInAnnotation=YES images
    quarantine: list[tuple[str, str]]
    share: float  # the quarantined share of the files


def _reason_kind(reason: str) -> str:
    """A reason without its particulars (numbers, quoted values), to count reasons by kind."""
    return re.sub(r"(?<![A-Za-z]-)\d+", "N", re.sub(r"'[^']*'", "'...'", reason))  # UTF-8 stays


def commonest_reasons(quarantine: list[tuple[str, str]], k: int = 5) -> list[tuple[int, str]]:
    counts = Counter(_reason_kind(r) for _, r in quarantine)
    return [(n, kind) for kind, n in counts.most_common(k)]


def reasons_text(quarantine: list[tuple[str, str]], k: int = 5) -> str:
    return "; ".join(f"{n} x {kind}" for n, kind in commonest_reasons(quarantine, k))


def _contents(df: pd.DataFrame, labels: Labels) -> dict[str, Any]:
    """The sidecar's rows, splits and classes."""
    name_of = labels.name_of
    return {
        "rows": len(df),
        "splits": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "labels": {str(k): v for k, v in sorted(name_of.items())},
        "label_rule": labels.rule,
        "label_counts": {
            f"{s}/{name_of.get(k, 'unlabelled' if k < 0 else k)}": int(v)
            for (s, k), v in df.groupby(["split", "label"]).size().items()
        },
    }


def _groups(df: pd.DataFrame, dups: pd.DataFrame, rules: Counter[str]) -> dict[str, Any]:
    """The sidecar's duplicate groups and patients."""
    pats = {s: set(df.loc[df["split"] == s, "patient_id"]) for s in SPLITS}
    return {
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
    }


def manifest_meta(run: Ingested, df: pd.DataFrame, dups: pd.DataFrame) -> dict[str, Any]:
    """The manifest's sidecar: where it came from, how it was read, and what it holds."""
    cfg, src, labels = run.cfg, run.src, run.labels
    if labels.name_of:
        src.details.append(
            "classes: "
            + ", ".join(f"{j} {n}" for j, n in sorted(labels.name_of.items()))
            + f" (order: {labels.rule})"
        )
    meta = {
        "source": str(run.source.resolve()),
        "source_kind": src.kind,
        "layout": src.layout,
        "layout_details": src.details,
        "data_root_abs": str(src.root),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **_contents(df, labels),
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "quarantined": len(run.quarantine),
        "quarantined_share": round(run.share, 4),
        "max_quarantined": cfg.max_quarantined,
        "ignored_files": src.ignored,
        **_groups(df, dups, run.rules),
        "warnings": src.warnings,
        "max_pixels": cfg.max_pixels,
        "decode_memory_peak_mb": round(run.budget.peak / 2**20, 1),
        # True when allow_burned_in let BurnedInAnnotation=YES images in: their pixels may show
        # identifying text, so no real-image grid of this manifest may be logged (see
        # manifest.may_hold_burned_in)
        "may_hold_burned_in": bool(run.burned_in),
        "burned_in_paths": sorted(run.burned_in),
    }
    if src.npz_note:
        meta["npz_pixels"] = src.npz_note
    return meta


def print_report(res: IngestResult, meta: dict[str, Any], qpath: Path, dpath: Path) -> None:
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
