"""Reading the candidates: screening them before any is opened (data root, labels, names, patient
pattern), the PHI salt resolved once, then every file decoded in a thread pool under a memory
budget and recorded (format, size, pixel hash, patient). A file that fails is quarantined with a
one-line reason; the batch goes on."""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.ingest.candidates import Candidate, printable, safe_resolve, shown, utf8_problem
from pipeline.ingest.config import IngestConfig
from pipeline.ingest.labels import Labels
from pipeline.ingest.patients import patient_from_path
from pipeline.ingest.sources import Sourced
from transforms import phi
from transforms.io import (
    MAX_PIXELS,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    CXRReadError,
    check_pixels,
    pixel_hash,
    read_dicom_header,
    read_header,
    read_image,
    suffix_of,
)
from transforms.manifest import is_inside
from transforms.redact import redact_values

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
        return printable(e.reason)
    return printable(redact_values(f"{type(e).__name__}: {e}"))  # no element value in a (shared) report


def _may_be_dicom(p: Path) -> bool:
    """DICOM files carry any suffix or none; these are the ones that are surely something else."""
    return suffix_of(p) not in PIL_SUFFIXES | NIFTI_SUFFIXES


def screen(cfg: IngestConfig, src: Sourced, labels: Labels, quarantine: list[tuple[str, str]]) -> list[int]:
    """The candidates worth opening (indices); the rest go to ``quarantine`` with their reason: a
    path outside the data root (refused before it is opened), a bad label or name, no patient."""
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    todo: list[int] = []
    for i, c in enumerate(src.cands):
        rel = os.path.relpath(c.abs_path, src.root)
        real = safe_resolve(c.abs_path)
        if not is_inside(real, src.root):
            how = "symlink leads" if c.abs_path.is_symlink() else "path lies"
            reason = f"{how} outside the data root {src.root}"
        else:
            reason = c.problem or labels.bad.get(i) or utf8_problem(rel)
        if reason is None and pattern is not None:
            m = pattern.search(Path(rel).as_posix())
            if m is None or not m.group("patient"):
                reason = f"patient_pattern {cfg.patient_pattern!r} does not match this path"
            else:
                c.patient_id, c.patient_rule = m.group("patient"), "patient_pattern"
        if reason is not None:
            quarantine.append((shown(c.abs_path), printable(reason)))
        else:
            todo.append(i)
    return todo


def pseudonymise_table_ids(cfg: IngestConfig, cands: list[Candidate], todo: list[int]) -> bytes | None:
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


def decode_files(
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
                quarantine.append((shown(c.abs_path), err))
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
