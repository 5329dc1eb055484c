"""The ingest stage, ``ingest(cfg)``: a source's candidate files screened, decoded and recorded,
``val`` carved from the rest by patient, pixel-identical images grouped, and the manifest written
with its sidecar, quarantine and duplicates reports (the package docstring tells the rules)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.infra.sampling import draw_patients
from pipeline.ingest.candidates import printable, shown
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.decode import DecodeBudget, decode_files, pseudonymise_table_ids, screen
from pipeline.ingest.labels import class_warnings, parse_labels
from pipeline.ingest.report import Ingested, IngestResult, manifest_meta, print_report, reasons_text
from pipeline.ingest.sources import gather
from transforms.manifest import COLUMNS, write_csv, write_manifest


class IngestError(ValueError):
    """Ingest ran but its result must not be used: every file failed, or too many did. The
    quarantine report is written; the message names the commonest reasons."""


def _val_count(n: int, fraction: float) -> int:
    """How many of a stratum's ``n`` patients go to val: ``fraction`` of them, rounded, and at
    least one stays on each side when there are two or more."""
    k = int(round(n * fraction))
    return min(max(k, 1), n - 1) if n >= 2 else k


def carve_val_by_patient(df: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """Assign ``val`` to about ``fraction`` of the non-test patients, stratified by label."""
    split = df["split"].copy()
    pool = df[split != "test"]
    if fraction <= 0 or pool.empty:
        return split.where(split == "test", "train")
    val_patients = draw_patients(
        pool["label"], pool["patient_id"], lambda n: _val_count(n, fraction), seed, "shuffle"
    )
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


def default_out(source: Path) -> Path:
    name = source.stem if source.is_file() else source.name
    return Path("data_manifests") / f"{name}.csv"


def ingest(cfg: IngestConfig) -> IngestResult:
    """Ingest a folder, .npz or CSV of chest radiographs into a checked CSV manifest."""
    if not cfg.source:
        raise ValueError("ingest needs a SOURCE (folder, .npz or .csv)")
    source = Path(cfg.source)
    if not source.exists():
        raise FileNotFoundError(f"ingest source {source} does not exist")
    out = _check_out(cfg, source)
    src = gather(cfg, source)
    labels = parse_labels(src.cands, src.label_names, src.free_names)
    quarantine: list[tuple[str, str]] = [(shown(f), printable(r)) for f, r in src.pre_quarantine]
    todo = screen(cfg, src, labels, quarantine)
    src.warnings += class_warnings(src.cands, labels, todo, src.by_split)
    salt = pseudonymise_table_ids(cfg, src.cands, todo)
    budget = DecodeBudget(int(cfg.decode_memory_mb * 2**20))
    rows, rules, burned_in = decode_files(cfg, src, labels, todo, salt, budget, quarantine)
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
    run = Ingested(cfg, source, src, labels, budget, rules, burned_in, quarantine, share)
    meta = manifest_meta(run, df, dups)
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
    print_report(res, meta, qpath, dpath)
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


def _check_quarantined(
    cfg: IngestConfig, source: Path, n_rows: int, quarantine: list[tuple[str, str]], qpath: Path
) -> float:
    """The quarantined share; no manifest when every file, or more than ``max_quarantined``, failed."""
    total = n_rows + len(quarantine)
    if not n_rows:
        raise IngestError(
            f"ingest source {source}: every file failed ({len(quarantine)} quarantined -> {qpath}); "
            f"commonest reasons: {reasons_text(quarantine)}"
        )
    share = len(quarantine) / total
    if share > cfg.max_quarantined:
        raise IngestError(
            f"ingest source {source}: {len(quarantine)} of {total} files ({share:.0%}) quarantined, more "
            f"than max_quarantined={cfg.max_quarantined:g}; no manifest written. Commonest reasons: "
            f"{reasons_text(quarantine)}. Every file and its reason: {qpath}. Fix the files, or set "
            f"max_quarantined={math.ceil(share * 100) / 100:g} to accept the rest"
        )
    return share
