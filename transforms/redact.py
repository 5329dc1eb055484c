"""DICOM element values kept out of every message, warning and log record: no PHI leaves a reader.

pydicom validates element values while reading and reports a non-conformant one by quoting it in
a warning and a log record ("Invalid value for VR UI: '1.2.840.MRN12345'"); exception texts
(int('...'), decoders) quote values too. A value may be an identifier, so DICOM is read inside
:func:`quiet_dicom` and every message built from an exception goes through :func:`redact_values`.
Patient identifiers themselves are pseudonymised by :mod:`transforms.phi`.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[Any, ...] = ()


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP_RECORDS = _DropRecords()


@contextmanager
def quiet_dicom() -> Iterator[None]:
    """Read DICOM without value validation, warnings or ``pydicom`` log records.

    pydicom's settings, the ``warnings`` filters and the logger are process-wide, so this is
    reference-counted: the first thread in switches them, the last one out restores them (a plain
    ``warnings.catch_warnings`` per thread would restore them out of order). While any thread is
    inside, warnings from every thread are ignored."""
    global _quiet_depth, _quiet_saved
    from pydicom import config

    with _quiet_lock:
        if _quiet_depth == 0:
            logger = logging.getLogger("pydicom")
            caught = warnings.catch_warnings()
            caught.__enter__()
            warnings.simplefilter("ignore")
            mode = getattr(
                config.settings, "_reading_validation_mode", config.settings.reading_validation_mode
            )
            _quiet_saved = (caught, mode, logger.propagate)
            config.settings.reading_validation_mode = config.IGNORE
            logger.propagate = False  # records of pydicom.* loggers stop at "pydicom"
            logger.addFilter(_DROP_RECORDS)  # and those of "pydicom" itself are dropped
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                caught, mode, propagate = _quiet_saved
                logger = logging.getLogger("pydicom")
                logger.removeFilter(_DROP_RECORDS)
                logger.propagate = propagate
                if hasattr(config.settings, "_reading_validation_mode"):
                    config.settings._reading_validation_mode = mode
                else:
                    config.settings.reading_validation_mode = mode
                caught.__exit__(None, None, None)
                _quiet_saved = ()


# text VRs whose values may identify someone (CS/IS/DS/US are coded or numeric)
_FREE_TEXT_VRS = {"AE", "AS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_QUOTED = re.compile(r"(?<!\w)b?'[^'\n]*'(?!\w)" r'|(?<!\w)b?"[^"\n]*"(?!\w)')
REDACTED = "<value>"


@lru_cache(maxsize=1)
def _dicom_vocabulary() -> frozenset[str]:
    """Quoted words that are safe to keep: attribute keywords and names, registered UIDs and
    their names (e.g. 'Transfer Syntax UID', 'JPEG 2000 Image Compression')."""
    from pydicom.datadict import DicomDictionary
    from pydicom.uid import UID_dictionary

    words = {"DICM", "file_meta"}
    for entry in DicomDictionary.values():
        words.update((entry[2], entry[4]))
    for uid, entry in UID_dictionary.items():
        words.update((uid, entry[0], entry[4]))
    words.discard("")
    return frozenset(words)


def _text_values(ds: Any) -> set[str]:
    """The free-text element values of a (partly read) dataset, without converting them."""
    from pydicom.datadict import dictionary_VR

    values: set[str] = set()
    try:
        tags = list(ds.keys())
    except Exception:
        return values
    for tag in tags:
        try:
            elem = ds.get_item(tag)
            vr = elem.VR or dictionary_VR(tag)
            if vr not in _FREE_TEXT_VRS or elem.value is None:
                continue
            raw = elem.value
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        except Exception:
            continue
        for part in re.split(r"[\\\x00]", text):  # multi-valued, NUL padding
            part = part.strip()
            if len(part) >= 3 and part not in _dicom_vocabulary():
                values.add(part)
    return values


def redact_values(text: str, ds: Any = None) -> str:
    """``text`` on one line with DICOM element values taken out: every quoted literal that is not
    a DICOM keyword, attribute name or registered UID, and every free-text value of ``ds``."""
    vocabulary = _dicom_vocabulary()

    def quoted(m: re.Match) -> str:
        inner = m.group(0).lstrip("b")[1:-1]
        return m.group(0) if inner in vocabulary else REDACTED

    text = _QUOTED.sub(quoted, " ".join(str(text).split()))
    if ds is not None:
        for value in sorted(_text_values(ds), key=len, reverse=True):
            text = text.replace(value, REDACTED)
    return text
