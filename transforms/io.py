"""Readers that turn one chest-radiograph file into an upright 2D float array.

Every reader returns ``(array, info)`` where ``array`` is ``float32`` of shape ``(H, W)`` with row 0
at the top of the image (the way a radiologist sees it) and larger values brighter, and ``info``
holds the format facts the manifest records. Failures raise :class:`CXRReadError` whose message
names the file and the problem in one line, so batch jobs can quarantine the file and go on.

Why not MONAI's ``LoadImage`` readers: ``PILReader`` returns ``(W, H)`` (it reverses the indexing),
and no MONAI reader applies the DICOM modality/VOI LUTs or inverts MONOCHROME1, all of which a
chest radiograph needs to look right.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | PIL_SUFFIXES | NIFTI_SUFFIXES

# A decoded image above this many pixels is refused rather than allocated: a header that declares
# a huge size is far more likely corrupt than a real radiograph (the largest CR plates are ~4300 px).
MAX_PIXELS = 12_000 * 12_000


class CXRReadError(ValueError):
    """An image file that cannot be read as a 2D chest radiograph; the message names file and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, always
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class ImageInfo:
    """Facts about the stored image (before any normalisation)."""

    format: str  # dicom | png | jpeg | nifti
    height: int
    width: int
    bits_stored: int
    photometric: str  # MONOCHROME1 | MONOCHROME2 | RGB | ...
    transfer_syntax: str = ""


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def sniff_format(path: str | Path) -> str:
    """Decide the format from the file's content first (magic bytes), then from its suffix."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise CXRReadError(p, "broken symlink or symlink loop: the link leads to no file")
    if not p.exists():
        raise CXRReadError(p, "file does not exist")
    if not p.is_file():
        raise CXRReadError(p, "not a regular file")
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise CXRReadError(p, f"cannot be opened: {e.strerror or e}") from e
    if len(head) == 0:
        raise CXRReadError(p, "empty file (0 bytes)")
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    suffix = suffix_of(p)
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    if suffix in DICOM_SUFFIXES:
        return "dicom"  # DICOM without the 128-byte preamble; pydicom decides
    if suffix in PIL_SUFFIXES:
        raise CXRReadError(
            p, f"not a {suffix[1:].upper()} image: the content does not start with its signature"
        )
    raise CXRReadError(p, f"unsupported file type '{suffix or '(no suffix)'}'")


def read_image(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """Read any supported file into an upright float32 ``(H, W)`` array (brighter = denser)."""
    fmt = sniff_format(path)
    reader = {"dicom": read_dicom, "png": read_pil, "jpeg": read_pil, "nifti": read_nifti}[fmt]
    try:
        arr, info = reader(path)
    except CXRReadError:
        raise
    except Exception as e:  # a malformed header (wrong VR, garbage values): name the file, one line
        text = f"{type(e).__name__}: {e}"
        if fmt == "dicom":
            text = redact_values(text)
        raise CXRReadError(path, f"malformed {fmt.upper()} file: {' '.join(text.split())}") from e
    if arr.ndim != 2:
        raise CXRReadError(path, f"expected a 2D image, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise CXRReadError(path, "pixel data contains NaN or Inf values")
    return arr, info


# ------------------------------------------------------------------------------ DICOM values: no PHI
# pydicom validates element values while reading and reports a non-conformant one by quoting it in
# a warning and a log record ("Invalid value for VR UI: '1.2.840.MRN12345'"); exception texts
# (int('...'), decoders) quote values too. A value may be an identifier, so DICOM is read inside
# quiet_dicom() and every message built from an exception goes through redact_values().
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


def read_dicom_header(path: str | Path, keywords: Sequence[str]) -> dict[str, str]:
    """The string values of ``keywords`` ('' when absent) from a DICOM header, read quietly.

    Failures raise :class:`CXRReadError` with the element values redacted."""
    import pydicom

    p = Path(path)
    with quiet_dicom():
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:
            raise CXRReadError(
                p, f"DICOM header unreadable ({redact_values(f'{type(e).__name__}: {e}')})"
            ) from e
        try:
            return {k: str(ds.get(k, "") or "") for k in keywords}
        except Exception as e:
            raise CXRReadError(
                p, f"DICOM header unreadable ({redact_values(f'{type(e).__name__}: {e}', ds)})"
            ) from e


def pixel_hash(arr: np.ndarray) -> str:
    """Content hash of decoded pixels (shape + values): equal for pixel-identical images."""
    h = hashlib.sha1()
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- DICOM
_PHOTOMETRICS = {
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
}  # fmt: skip


def read_dicom(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """Read quietly (see :func:`quiet_dicom`); no element value reaches an error message."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    with quiet_dicom():
        try:
            ds = pydicom.dcmread(p)
        except InvalidDicomError as e:
            raise CXRReadError(p, f"not a DICOM file ({redact_values(str(e))})") from e
        except Exception as e:  # truncated headers raise EOFError, struct.error, OSError ...
            raise CXRReadError(
                p, f"DICOM header unreadable ({redact_values(f'{type(e).__name__}: {e}')})"
            ) from e
        try:
            return _dicom_pixels(p, ds)
        except CXRReadError:
            raise
        except Exception as e:  # a malformed element (wrong VR, text where a number belongs ...)
            raise CXRReadError(
                p, f"malformed DICOM file: {redact_values(f'{type(e).__name__}: {e}', ds)}"
            ) from e


def _dicom_pixels(p: Path, ds: Any) -> tuple[np.ndarray, ImageInfo]:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from pydicom.uid import UID_dictionary

    if "PixelData" not in ds:
        kind = "float pixel data" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no"
        raise CXRReadError(p, f"DICOM has {kind} Pixel Data element (7FE0,0010): not an image object")
    for tag in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(tag) in (None, ""):
            raise CXRReadError(p, f"DICOM is missing the required {tag} attribute")
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored") or bits_alloc)
    if bits_stored > bits_alloc:
        raise CXRReadError(p, f"BitsStored ({bits_stored}) exceeds BitsAllocated ({bits_alloc})")
    if rows * cols > MAX_PIXELS:
        raise CXRReadError(p, f"declared size {rows}x{cols} is implausibly large for a radiograph")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise CXRReadError(
            p, f"multi-frame DICOM (NumberOfFrames={frames}): only single 2D images are supported"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _PHOTOMETRICS:  # the value itself stays out of the message: free text
        raise CXRReadError(p, "non-standard PhotometricInterpretation: not a DICOM defined term")
    tsuid = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    # a registered name, never the raw value: an unregistered UID is free text from the file
    ts_name = (
        UID_dictionary[tsuid][0] if tsuid in UID_dictionary else ("unknown transfer syntax" if tsuid else "")
    )

    try:
        arr = ds.pixel_array  # decoder warnings are silenced by quiet_dicom
    except Exception as e:  # missing decoder plugin, short pixel data, corrupt codestream
        raise CXRReadError(
            p, f"cannot decode pixel data ({ts_name}): {redact_values(f'{type(e).__name__}: {e}', ds)}"
        ) from e

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise CXRReadError(p, f"expected a 2D image, decoded shape {tuple(arr.shape)}")
        out = apply_modality_lut(arr, ds)
        # VOI LUT or window centre/width when the file carries one: that is how the modality meant
        # the image to be displayed. apply_voi_lut returns its input when neither is present.
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        out = np.asarray(out, dtype=np.float32)
        if photometric == "MONOCHROME1":
            # MONOCHROME1: low values are bright. Negate so that brighter = denser everywhere;
            # intensity normalisation later rescales, so the sign flip is all that is needed.
            out = -out
    else:
        # Colour DICOM (e.g. secondary capture): collapse to grey like the PNG/JPEG path.
        from pydicom.pixels import convert_color_space

        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise CXRReadError(p, f"unsupported {photometric} pixel layout {tuple(arr.shape)}")
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        out = _rgb_to_grey(arr[..., :3])
    return out, ImageInfo("dicom", rows, cols, bits_stored, photometric, ts_name)


# ----------------------------------------------------------------------------------------- PNG/JPEG
def read_pil(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            fmt = (im.format or "").lower()
            im.load()
            # JPEGs from phones/scanners may carry an EXIF rotation: honour it to stay upright.
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im).astype(np.float32)
                bits = 16 if mode.startswith("I;16") else 32
                photometric = "MONOCHROME2"
            elif mode in ("L", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)
                bits, photometric = 8, "MONOCHROME2"
            else:  # RGB, RGBA, P, LA, CMYK ... -> grey (radiographs saved as colour)
                rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
                arr = _rgb_to_grey(rgb)
                bits, photometric = 8, "RGB"
    except UnidentifiedImageError as e:
        raise CXRReadError(p, "cannot identify image content (not a valid PNG/JPEG)") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated streams, bad chunks
        raise CXRReadError(p, f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    fmt = "jpeg" if fmt in ("jpeg", "mpo") else fmt
    return arr, ImageInfo(fmt or "unknown", arr.shape[0], arr.shape[1], bits, photometric)


def _rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, the same weights Pillow's convert("L") uses.
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# -------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """2D NIfTI. Convention (same as MONAI/ITK): array axis 0 is the column (x), axis 1 the row (y),
    so the upright image is the transpose. Singleton trailing axes are dropped."""
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise CXRReadError(p, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    data = np.squeeze(data)
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        data = _rgb_to_grey(data[..., :3])
    if data.ndim != 2:
        raise CXRReadError(p, f"NIfTI is not a 2D image (shape {tuple(np.asanyarray(img.dataobj).shape)})")
    arr = np.ascontiguousarray(data.T, dtype=np.float32)
    bits = int(np.dtype(img.get_data_dtype()).itemsize * 8)
    return arr, ImageInfo("nifti", arr.shape[0], arr.shape[1], bits, "MONOCHROME2")
