"""Readers that turn one chest-radiograph file into an upright 2D float array.

Every reader returns ``(array, info)`` where ``array`` is ``float32`` of shape ``(H, W)`` with row 0
at the top of the image (the way a radiologist sees it) and larger values brighter, and ``info``
holds the format facts the manifest records. Failures raise :class:`CXRReadError` whose message
names the file and the problem in one line, so batch jobs can quarantine the file and go on.

Every reader checks the image's size from its header before decoding a pixel (Pillow's lazily read
size, NIfTI's header shape, DICOM's Rows/Columns): one cap, :data:`MAX_PIXELS` (or ``max_pixels``),
for all of them, so a small file that declares a huge image is refused, never allocated.
:func:`read_header` gives that size alone, so callers can bound the memory of parallel decoding.

Why not MONAI's ``LoadImage`` readers: ``PILReader`` returns ``(W, H)`` (it reverses the indexing),
and no MONAI reader applies the DICOM modality/VOI LUTs or inverts MONOCHROME1, all of which a
chest radiograph needs to look right.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transforms.config import MAX_PIXELS  # also re-exported; it lives in transforms.config (no numpy)
from transforms.redact import quiet_dicom, redact_values

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | PIL_SUFFIXES | NIFTI_SUFFIXES

# Peak bytes per pixel while one image is decoded into float32 (decoder buffer, conversions, the
# float32 result and the checks on it); colour images add 8 bytes per extra sample. An upper bound
# used to budget parallel decoding, not an exact figure.
DECODE_BYTES_PER_PIXEL = 16


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


@dataclass(frozen=True)
class HeaderInfo:
    """The stored image's size as its header declares it, read without decoding any pixel."""

    format: str  # dicom | png | jpeg | nifti
    height: int
    width: int
    samples: int = 1  # values per pixel: 1 grey, 3 RGB, 4 RGBA/CMYK
    frames: int = 1  # DICOM NumberOfFrames

    @property
    def pixels(self) -> int:
        return self.height * self.width * self.frames

    @property
    def decode_bytes(self) -> int:
        """An upper bound of the memory that decoding this image into float32 takes at its peak."""
        return self.pixels * (DECODE_BYTES_PER_PIXEL + 8 * self.samples)


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


def _amount(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.0f} megapixel"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} megapixel"
    return f"{n:,} pixel"


# a chest radiograph is roughly square (detectors 35x43 cm and the like); 1:10 is no radiograph (a
# strip, a barcode, a stitched panorama) and squashed into a square it would be noise
MAX_ASPECT = 10.0


def check_pixels(path: str | Path, header: HeaderInfo, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, or a side more than
    :data:`MAX_ASPECT` times the other (before decoding)."""
    lo, hi = sorted((int(header.height), int(header.width)))
    if lo > 0 and hi / lo > MAX_ASPECT:
        raise CXRReadError(
            path,
            f"image is {header.height}x{header.width} px, an aspect ratio of 1:{hi / lo:.0f} (over 1:"
            f"{MAX_ASPECT:g}): not a radiograph",
        )
    if header.pixels > max_pixels:
        frames = f" x {header.frames} frames" if header.frames > 1 else ""
        raise CXRReadError(
            path,
            f"image is {header.height}x{header.width} px{frames} ({_amount(header.pixels)}s), over "
            f"the {_amount(max_pixels)} cap (max_pixels): refused before decoding",
        )


def read_header(path: str | Path, fmt: str | None = None) -> HeaderInfo:
    """The declared size of any supported file, from its header alone (no pixel is decoded).

    Failures raise :class:`CXRReadError`; DICOM element values never reach the message."""
    fmt = fmt or sniff_format(path)
    reader = {"dicom": _dicom_header, "png": _pil_header, "jpeg": _pil_header, "nifti": _nifti_header}[fmt]
    try:
        return reader(Path(path), fmt)
    except CXRReadError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if fmt == "dicom":
            text = redact_values(text)
        raise CXRReadError(path, f"malformed {fmt.upper()} header: {text}") from e


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Read any supported file into an upright float32 ``(H, W)`` array (brighter = denser).

    The header's size is checked against ``max_pixels`` before any pixel is decoded."""
    fmt = sniff_format(path)
    check_pixels(path, read_header(path, fmt), max_pixels)
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
    if np.iscomplexobj(arr):  # e.g. MR k-space in a NIfTI: no intensity image (casting drops a part)
        raise CXRReadError(path, f"pixel data are complex numbers ({arr.dtype}): not a radiograph")
    if not np.isfinite(arr).all():
        raise CXRReadError(path, "pixel data contains NaN or Inf values")
    return arr, info


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
    h.update(np.ascontiguousarray(arr, dtype=np.float32))  # the buffer itself: no copy of the image
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks: the one file hash of the project
    (manifests, checkpoints, extractors, samples, ingest's ``.npz`` extraction folders)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dcmread(p: Path, **kw):
    """``pydicom.dcmread`` whose failures are one-line CXRReadErrors quoting no element value."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(p, **kw)
    except InvalidDicomError as e:
        raise CXRReadError(p, f"not a DICOM file ({redact_values(str(e))})") from e
    except Exception as e:  # truncated headers raise EOFError, struct.error, OSError ...
        raise CXRReadError(p, f"DICOM header unreadable ({redact_values(f'{type(e).__name__}: {e}')})") from e


def _dicom_header(p: Path, fmt: str) -> HeaderInfo:

    with quiet_dicom():
        ds = _dcmread(p, stop_before_pixels=True)
        for tag in ("Rows", "Columns"):
            if ds.get(tag) in (None, ""):
                raise CXRReadError(p, f"DICOM is missing the required {tag} attribute")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames") or 1)
            samples = int(ds.get("SamplesPerPixel") or 1)
        except Exception as e:  # a size element holding text: the message must not quote it
            raise CXRReadError(
                p, f"malformed DICOM file: {redact_values(f'{type(e).__name__}: {e}', ds)}"
            ) from e
    return HeaderInfo("dicom", rows, cols, max(samples, 1), max(frames, 1))


def _pil_header(p: Path, fmt: str) -> HeaderInfo:
    """Pillow reads only the header when it opens a file. The format's own class is used rather
    than ``Image.open``, which refuses (DecompressionBombError) before the size can be reported."""
    from PIL import JpegImagePlugin, PngImagePlugin

    cls = PngImagePlugin.PngImageFile if fmt == "png" else JpegImagePlugin.JpegImageFile
    try:
        with open(p, "rb") as f:
            im = cls(f)
            width, height = im.size
            samples = len(im.getbands())
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise CXRReadError(p, f"corrupt or truncated image header ({type(e).__name__}: {e})") from e
    return HeaderInfo(fmt, int(height), int(width), samples)


def _nifti_layout(p: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(x, y, samples)`` of a NIfTI image of ``shape``: 2-D after dropping singleton axes, or
    colour stored the NIfTI way (x, y, 1, 1, 3|4). Anything else is refused: a 3-slice volume is
    not an RGB image."""
    if len(shape) == 5 and shape[2] == shape[3] == 1 and shape[4] in (3, 4):
        return int(shape[0]), int(shape[1]), int(shape[4])
    dims = [int(d) for d in shape if d != 1]
    if len(dims) == 2:
        return dims[0], dims[1], 1
    if len(dims) > 2:
        raise CXRReadError(
            p,
            f"NIfTI is a {len(dims)}-D volume (shape {tuple(int(d) for d in shape)}): only 2-D images "
            f"are read; save one slice (or a projection) as its own file",
        )
    raise CXRReadError(p, f"NIfTI is not a 2-D image (shape {tuple(int(d) for d in shape)})")


def _nifti_header(p: Path, fmt: str) -> HeaderInfo:
    import nibabel as nib

    try:
        shape = tuple(nib.load(str(p)).shape)  # the header alone: no data is read
    except Exception as e:
        raise CXRReadError(p, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    x, y, samples = _nifti_layout(p, shape)
    return HeaderInfo("nifti", y, x, samples)  # axis 0 is the column (see read_nifti)


# --------------------------------------------------------------------------------------------- DICOM
_PHOTOMETRICS = {
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
    "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
}  # fmt: skip


def read_dicom(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """Read quietly (see :func:`quiet_dicom`); no element value reaches an error message."""

    p = Path(path)
    with quiet_dicom():
        ds = _dcmread(p)
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
        with Image.open(p) as im:  # lazy: only the header is read here
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
                rgb = np.asarray(im if mode == "RGB" else im.convert("RGB"))  # uint8: 3 bytes/px
                arr = _rgb_to_grey(rgb)
                bits, photometric = 8, "RGB"
    except Image.DecompressionBombError as e:  # only when max_pixels is above Pillow's own limit
        raise CXRReadError(p, f"image too large to decode ({e})") from e
    except UnidentifiedImageError as e:
        raise CXRReadError(p, "cannot identify image content (not a valid PNG/JPEG)") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated streams, bad chunks
        raise CXRReadError(p, f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    fmt = "jpeg" if fmt in ("jpeg", "mpo") else fmt
    return arr, ImageInfo(fmt or "unknown", arr.shape[0], arr.shape[1], bits, photometric)


def _rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the same weights Pillow's convert("L") uses, as float32. Computed in bands
    of rows so that no full-size float copy of the colour image is made (12 bytes a pixel)."""
    out = np.empty(rgb.shape[:2], dtype=np.float32)
    step = max(1, (1 << 22) // max(1, rgb[0].size))  # ~4 M values per band
    for a in range(0, rgb.shape[0], step):
        band = rgb[a : a + step].astype(np.float32)
        out[a : a + step] = band[..., 0] * 0.299 + band[..., 1] * 0.587 + band[..., 2] * 0.114
    return out


# -------------------------------------------------------------------------------------------- NIfTI
def read_nifti(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """2D NIfTI. Convention (same as MONAI/ITK): array axis 0 is the column (x), axis 1 the row (y),
    so the upright image is the transpose. Singleton axes are dropped; colour is only the NIfTI
    vector layout (x, y, 1, 1, 3|4); a volume (x, y, z) is refused, never averaged."""
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
    except Exception as e:
        raise CXRReadError(p, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    x, y, samples = _nifti_layout(p, tuple(img.shape))  # before any data is read
    if np.issubdtype(img.get_data_dtype(), np.complexfloating):  # k-space: the cast would drop a part
        raise CXRReadError(p, f"pixel data are complex numbers ({img.get_data_dtype()}): not a radiograph")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise CXRReadError(p, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    data = data.reshape(x, y, samples) if samples > 1 else data.reshape(x, y)
    if samples > 1:
        data = _rgb_to_grey(data[..., :3])
    arr = np.ascontiguousarray(data.T, dtype=np.float32)
    bits = int(np.dtype(img.get_data_dtype()).itemsize * 8)
    return arr, ImageInfo("nifti", arr.shape[0], arr.shape[1], bits, "MONOCHROME2")
