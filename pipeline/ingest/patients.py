"""Patient ids from paths, by the naming rules of public chest X-ray sets (the last resort of
ingest, after ``patient_pattern=``, a table's patient column and DICOM PatientID)."""

from __future__ import annotations

import re
from pathlib import Path

from transforms.io import IMAGE_SUFFIXES, suffix_of

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
