"""The ingest stage's config (``python -m pipeline.run ingest SOURCE [key=value ...]``), light
like every stage config (:mod:`pipeline.infra.stage_configs`): the CLI validates it and answers
``--help`` before the stage's heavy imports."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from transforms.config import MAX_PIXELS

UNCERTAIN = ("quarantine", "negative", "positive")


@dataclass
class IngestConfig:
    source: str = ""
    out: str | None = None  # default: data_manifests/<source name>.csv
    # a label/metadata table (CSV) for a folder: a path column (full, partial or file name), a label
    # or finding column, an optional patient column; e.g. NIH's Data_Entry_2017.csv, CheXpert's train.csv
    labels: str | None = None
    label_names: list[str] | None = None  # class names for labels 0, 1, ... (overrides folder/table names)
    path_column: str = ""  # table column of image paths ("" = path, file, filename, Image Index ...)
    label_column: str = ""  # table column of labels ("" = label, labels, class, target, Finding Labels)
    patient_column: str = ""  # table column of patient ids ("" = patient_id, Patient ID, subject_id ...)
    # binary labels from one finding: 1 where it is present, 0 where not; read from a column of that
    # name (1 / 0 / -1 uncertain / empty = not mentioned, as CheXpert) or from a '|'-separated
    # findings column (as NIH's 'Finding Labels')
    finding: str = ""
    uncertain: str = "quarantine"  # a finding column's -1 (uncertain): quarantine | negative | positive
    # a regular expression with a (?P<patient>...) group, searched in each path relative to the data
    # root; it overrides every other patient id rule, and a file it does not match is quarantined
    patient_pattern: str = ""
    clear_patient_ids: bool = False  # write table patient ids in clear (default: salted HMAC, like DICOM's)
    val_fraction: float = 0.1
    seed: int = 0
    min_size: int = 16  # smaller images are quarantined: too small to be a radiograph
    extract_dir: str = "data/extracted"  # where .npz images are written as PNG (one folder per file content)
    workers: int = 0  # decoding threads; 0 = one per core
    data_root: str = ""  # CSV sources: paths must lie under this folder ("" = the CSV's folder)
    # DICOMs marked BurnedInAnnotation=YES may show a name or MRN in the pixels, which reach MLflow
    # in image grids: they are quarantined unless this is set, and then the manifest is flagged
    allow_burned_in: bool = False
    # ingest fails (exit 2, no manifest written, the quarantine report kept) when a larger share of
    # the files found is quarantined
    max_quarantined: float = 0.5
    max_pixels: int = MAX_PIXELS  # larger images (by their header) are quarantined before decoding
    decode_memory_mb: float = 1024  # estimated memory of the images being decoded at once stays under this

    RANGES: ClassVar[dict[str, str]] = {"workers": "[0, 4096]", "decode_memory_mb": "(0, 1e9]"}

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if not 0 <= self.max_quarantined <= 1:
            raise ValueError(f"max_quarantined must be in [0, 1], got {self.max_quarantined}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if not self.decode_memory_mb > 0:
            raise ValueError(f"decode_memory_mb must be > 0, got {self.decode_memory_mb}")
        if self.uncertain not in UNCERTAIN:
            raise ValueError(f"uncertain must be one of {', '.join(UNCERTAIN)}, got {self.uncertain!r}")
        if self.patient_pattern:
            try:
                rx = re.compile(self.patient_pattern)
            except re.error as e:
                raise ValueError(
                    f"patient_pattern {self.patient_pattern!r} is not a valid regular expression ({e})"
                ) from e
            if "patient" not in rx.groupindex:
                raise ValueError(
                    f"patient_pattern {self.patient_pattern!r} needs a named group (?P<patient>...) "
                    "for the patient id, e.g. patient_pattern='^(?P<patient>[^_]+)_'"
                )
