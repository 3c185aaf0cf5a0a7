"""Expand one input file (an image, a DICOM or an archive of them) into the images to score.

Pure and Ray-free: it reads a file object it is handed (never storage, the network or the disk
itself) and yields each image as soon as it is decoded, so memory holds one source image at a
time however many an archive or a multi-frame DICOM holds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import lzma
import re
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import IO

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_rescale,
    apply_voi,
    apply_windowing,
    get_decoder,
    iter_pixels,
)
from pydicom.pixels.utils import get_nr_frames
from pydicom.sequence import Sequence

from brainray.config import IMAGE_EXTENSIONS
from brainray.transforms import ImageDecodeError, decode_image

IMAGE_SUFFIXES: tuple[str, ...] = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
ARCHIVE_SUFFIXES: tuple[str, ...] = (".zip", ".tar", ".tar.gz", ".tgz")

_IMAGE, _DICOM, _ARCHIVE = "image", "dicom", "archive"
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128  # a DICOM file is a 128-byte preamble, then b"DICM"
_MAGIC_END = _DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC)

# What `identify` needs to see of a file whose name does not tell: the DICM marker, or for a file
# named like a DICOMDIR its file meta group too (which names its SOP class; ~200 bytes).
DICOM_PROBE_BYTES = _MAGIC_END
DICOMDIR_PROBE_BYTES = 4096
INPUT, INDEX = "input", "index"  # what `identify` finds: an input to score, a DICOMDIR to skip
DICOMDIR_REASON = "a DICOMDIR (the index of a DICOM file-set), not an image"

# What the standard library raises on corrupt, truncated, encrypted or exotic archives.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
                   OSError, RuntimeError, ValueError)


@dataclass(frozen=True)
class SourceLimits:
    """Bounds that keep one hostile or huge input from exhausting a scoring worker."""

    max_image_pixels: int = 64_000_000  # per image / per DICOM frame
    max_frames: int = 2_000  # per DICOM file
    max_member_bytes: int = 512 * 1024**2  # uncompressed size of one archive member
    max_archive_bytes: int = 4 * 1024**3  # uncompressed bytes read from one archive in total
    # pixels decoded from one archive in total (every member and frame): a few KiB of PNG can
    # hold a 3000x3000 black image, so bytes alone do not bound the decoding work
    max_archive_pixels: int = 16 * 1024**3
    max_members: int = 100_000  # entries of one archive, directories and skipped files included


@dataclass(frozen=True)
class DicomTags:
    """Where a DICOM image sits in its study and series (to group slices); no patient data."""

    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    modality: str | None
    series_description: str | None
    instance_number: int | None


@dataclass(frozen=True)
class SourceImage:
    """One image to score, or the reason a file, member or frame could not become one."""

    member: str | None  # path inside an archive, else None
    frame: int | None  # DICOM frame index (0-based) for DICOM inputs, else None
    image: Image.Image | None  # decoded image (None when error)
    content_sha256: str  # sha256 of the file or archive member; "" when its bytes were not read
    error: str  # "" when ok, else a readable reason
    dicom: DicomTags | None = None  # for DICOM files whose header could be read

    @property
    def ok(self) -> bool:
        return not self.error


def is_supported(name: str) -> bool:
    """True when the name's extension is an image, DICOM or archive type (case-insensitive)."""
    return _kind_by_name(name) is not None


def is_archive(name: str) -> bool:
    """Archives are read as a stream of members; anything else is one image file, read whole."""
    return _kind_by_name(name) == _ARCHIVE


def needs_random_access(name: str) -> bool:
    """A zip's directory is at its end, so `expand` needs a seekable file for it."""
    return name.lower().endswith(".zip")


def probe_bytes(name: str) -> int:
    """How many leading bytes `identify` needs to tell what the file `name` is; 0 when the name
    says it (an image, DICOM or archive extension)."""
    if _is_dicomdir_name(name):
        return DICOMDIR_PROBE_BYTES
    return 0 if is_supported(name) else DICOM_PROBE_BYTES


def identify(name: str, head: bytes) -> str | None:
    """INPUT, INDEX (a DICOMDIR: skip it) or None (not an image), from the file's first
    `probe_bytes(name)` bytes: PACS exports name DICOM files IM0001 or by UID, without extension."""
    if _is_dicomdir_name(name) and _has_dicom_magic(head):
        if _media_sop_class(head) == uid.MediaStorageDirectoryStorage:
            return INDEX
    return INPUT if is_supported(name) or _has_dicom_magic(head) else None


def expand(name: str, source: IO[bytes],
           limits: SourceLimits = SourceLimits()) -> Iterator[SourceImage]:
    """Every image in the file `name` (used only for its extension), read from the binary file
    `source` (seekable for a zip: see `needs_random_access`), yielded as each is decoded.

    Archives are read member by member (a tar front to back); any other file is read whole.
    Never raises on bad content: each unreadable file, unsafe or oversized member and
    undecodable frame becomes a SourceImage with `error` set and no image. What `source` itself
    raises (the storage failing) propagates unchanged, for the caller to decide.
    """
    kind = _kind_by_name(name)
    guarded = _Guarded(source)
    try:
        if kind == _ARCHIVE:
            yield from _expand_archive(name, guarded, limits)
        else:
            yield from _expand_file(kind, guarded.read(), None, limits)
    except _SourceFailed as failed:
        cause = failed.__cause__
        raise cause from cause.__cause__


# --- type detection ---------------------------------------------------------------------------


def _kind_by_name(name: str) -> str | None:
    lowered = name.lower()
    for kind, suffixes in ((_IMAGE, IMAGE_SUFFIXES), (_DICOM, DICOM_SUFFIXES),
                           (_ARCHIVE, ARCHIVE_SUFFIXES)):
        if lowered.endswith(suffixes):
            return kind
    return None


def _is_dicomdir_name(name: str) -> bool:
    # PS3.10 names a file-set's index DICOMDIR; copies and test sets add suffixes to it.
    return re.split(r"[\\/]", name)[-1].upper().startswith("DICOMDIR")


def _has_dicom_magic(data: bytes) -> bool:
    return data[_DICOM_MAGIC_OFFSET:_MAGIC_END] == _DICOM_MAGIC


def _media_sop_class(head: bytes) -> str:
    """The file meta's Media Storage SOP Class UID, read from the start of a DICOM file."""
    try:
        with _quiet():
            ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, specific_tags=[])
            return str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    except MemoryError:
        raise
    except Exception:  # a head cut inside the meta group, or no DICOM after all
        return ""


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    media = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return media == uid.MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds


class _SourceFailed(Exception):
    """The caller's file failed (storage, network), as opposed to its content being bad."""


class _Guarded:
    """The caller's file, its own failures wrapped in _SourceFailed: the zip, tar and image
    libraries would otherwise report them as a corrupt archive."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def read(self, size: int = -1) -> bytes:
        return self._call(self._file.read, size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._call(self._file.seek, offset, whence)

    def tell(self) -> int:
        return self._call(self._file.tell)

    def seekable(self) -> bool:
        return self._call(self._file.seekable)

    @staticmethod
    def _call(method, *args):
        try:
            return method(*args)
        except Exception as exc:
            raise _SourceFailed() from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _failure(member: str | None, sha: str, reason: str, frame: int | None = None,
             dicom: DicomTags | None = None) -> SourceImage:
    return SourceImage(member=member, frame=frame, image=None, content_sha256=sha, error=reason,
                       dicom=dicom)


def _describe(exc: BaseException) -> str:
    # Library messages can span lines (pydicom lists every plugin); keep one readable line.
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def _expand_file(kind: str | None, data: bytes, member: str | None,
                 limits: SourceLimits) -> Iterator[SourceImage]:
    """A plain image or DICOM; the DICOM magic wins over the extension (scanners omit it)."""
    if _has_dicom_magic(data):
        yield from _expand_dicom(data, member, limits, force=False)
    elif kind == _DICOM:
        # Old files and raw datasets lack the preamble; the extension is the only hint.
        yield from _expand_dicom(data, member, limits, force=True)
    elif kind == _IMAGE:
        yield _expand_image(data, member, limits)
    else:
        yield _failure(member, _sha256(data), "unsupported file type")


# --- plain images -----------------------------------------------------------------------------


def _expand_image(data: bytes, member: str | None, limits: SourceLimits) -> SourceImage:
    sha = _sha256(data)
    try:
        # Multi-frame GIF/TIFF: decode_image loads frame 0 and leaves the image positioned there.
        image = decode_image(data, limits.max_image_pixels)
    except ImageDecodeError as exc:
        return _failure(member, sha, str(exc))
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise assorted types on hostile input
        return _failure(member, sha, f"not a decodable image: {_describe(exc)}")
    return SourceImage(member=member, frame=None, image=image, content_sha256=sha, error="")


# --- DICOM ------------------------------------------------------------------------------------

# Elements that pydicom's modality/VOI helpers read; enhanced multi-frame files move the rescale
# and window into per-frame functional groups, which _frame_view folds back in.
_LUT_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation",
                 "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "WindowCenter",
                 "WindowWidth", "VOILUTFunction", "VOILUTSequence")
_FRAME_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def _expand_dicom(data: bytes, member: str | None, limits: SourceLimits,
                  force: bool) -> Iterator[SourceImage]:
    sha = _sha256(data)
    if not data:
        yield _failure(member, sha, "empty file (0 bytes)")
        return
    ds, tags, problem = _open_dicom(data, force, limits)
    if ds is not None and _is_dicomdir(ds):
        # An index of other files: skipped inside archives like any non-image member. Listing
        # keeps DICOMDIRs out of scoring (they are counted there), so a plain one is rare.
        if member is None:
            yield _failure(member, sha, DICOMDIR_REASON)
    elif problem:
        yield _failure(member, sha, problem, dicom=tags)
    else:
        yield from _decode_frames(ds, member, sha, tags)


def _open_dicom(data: bytes, force: bool,
                limits: SourceLimits) -> tuple[Dataset | None, DicomTags | None, str]:
    """(dataset, its tags, why its pixels must not be decoded: "" when fine); the dataset is
    None when the file is unreadable."""
    ds = None
    try:
        with _quiet():
            ds = _read_dicom(data, force)
            if _is_dicomdir(ds):
                return ds, None, ""
            return ds, _dicom_tags(ds), _dicom_problem(ds, limits)
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed files
        return None, None, f"not a readable DICOM file: {_withholding_values(exc, ds)}"


def _read_dicom(data: bytes, force: bool) -> Dataset:

    ds = pydicom.dcmread(io.BytesIO(data), force=force)
    # force=True "reads" any bytes as a dataset of unknown tags: a PNG would become one
    # nonsense element, so demand at least one standard element.
    if force and not any(keyword_for_tag(tag) for tag in ds.keys()):
        raise ValueError("no DICOM elements found")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    # Raw datasets (no file meta) can only be uncompressed; pydicom knows how it parsed them but
    # will not decode pixels without an explicit transfer syntax.
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID") or ds.original_encoding[0] is None:
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = (uid.ExplicitVRLittleEndian if little
                                          else uid.ExplicitVRBigEndian)


def _transfer_syntax_label(ds: Dataset) -> str:
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    return f"'{tsyntax.name}' ({tsyntax})" if tsyntax else "'unknown'"


def _dicom_problem(ds: Dataset, limits: SourceLimits) -> str:
    """Why the pixels must not be decoded, checked from the header alone; "" when fine."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return "DICOM has no pixel data"
    if "Rows" not in ds or "Columns" not in ds:
        return "DICOM has pixel data but no Rows/Columns"
    pixels = int(ds.Rows) * int(ds.Columns)
    if pixels > limits.max_image_pixels:
        return (f"DICOM frame is {ds.Columns}x{ds.Rows} pixels, over the limit of "
                f"{limits.max_image_pixels}")
    frames = get_nr_frames(ds, warn=False)
    if frames > limits.max_frames:
        return f"DICOM has {frames} frames, over the limit of {limits.max_frames}"
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if not tsyntax:
        return "DICOM has no transfer syntax"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return f"DICOM transfer syntax {_transfer_syntax_label(ds)} is not supported"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        return (f"no decoder installed for DICOM transfer syntax {_transfer_syntax_label(ds)}"
                f" (needs one of: {missing})")
    return ""


def _decode_frames(ds: Dataset, member: str | None, sha: str,
                   tags: DicomTags | None) -> Iterator[SourceImage]:
    # One frame at a time, each yielded before the next is decoded: a long series never holds
    # its frames as 16-bit or float arrays, nor as images.
    frames = iter_pixels(ds)
    index = 0
    while True:
        try:
            with _quiet():
                frame = next(frames, None)
                if frame is None:
                    return
                image = _frame_to_image(frame, ds, index)
        except MemoryError:
            raise
        except Exception as exc:  # decoder plugins raise assorted types on corrupt data
            reason = (f"cannot decode DICOM pixel data (transfer syntax "
                      f"{_transfer_syntax_label(ds)}): {_withholding_values(exc, ds)}")
            yield _failure(member, sha, reason, frame=index, dicom=tags)
            return
        yield SourceImage(member=member, frame=index, image=image, content_sha256=sha, error="",
                          dicom=tags)
        index += 1


def _dicom_tags(ds: Dataset) -> DicomTags:
    number = _header_text(ds, "InstanceNumber")
    try:
        instance = int(float(number)) if number is not None else None
    except (ValueError, OverflowError):
        instance = None  # a malformed IS value: the column stays empty
    if instance is not None and not -2**31 <= instance < 2**31:
        instance = None  # outside IS's range (and the int32 column)
    return DicomTags(
        study_instance_uid=_header_text(ds, "StudyInstanceUID"),
        series_instance_uid=_header_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_header_text(ds, "SOPInstanceUID"),
        modality=_header_text(ds, "Modality"),
        series_description=_header_text(ds, "SeriesDescription"),
        instance_number=instance)


def _header_text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element: leave the column empty rather than fail the image
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


_SILENT = logging.NullHandler()


@contextmanager
def _quiet():
    """pydicom warns and logs about every non-conformance it tolerates, often quoting the header
    value at fault, which can be a patient's name: keep both out of the workers' logs. Its
    decoders log from child loggers (pydicom.pixels...), whose records bypass a disabled parent
    and reach the root handlers, so the "pydicom" logger stops them instead: only a handler
    that drops them, and no propagation (and, having a handler, no last-resort stderr output)."""
    logger = logging.getLogger("pydicom")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [_SILENT], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.handlers, logger.propagate = saved


_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
_PIECES = re.compile(r"[\\^=\x00\r\n]")  # value separators: multi-values, name components


def _withholding_values(exc: BaseException, ds: Dataset | None) -> str:
    """_describe(exc) without header values: parser and decoder messages quote the value they
    choke on, which may be patient data, and the error column is published."""
    text = _QUOTED.sub("'...'", _describe(exc))
    if ds is not None:
        for value in sorted(_header_values(ds), key=len, reverse=True):
            text = text.replace(value, "<withheld>")
    return text


def _header_values(ds: Dataset) -> set[str]:
    """Every text piece (3+ characters) of the header's values, read raw: converting them is
    what may have failed. Pixel data is skipped."""
    found: set[str] = set()
    for tag in list(ds.keys()):
        if tag.group == 0x7FE0:
            continue
        try:
            value = ds.get_item(tag).value  # raw bytes if never converted; never converts
        except Exception:
            continue
        if isinstance(value, Sequence):
            for item in value:
                found |= _header_values(item)
            continue
        if isinstance(value, MultiValue):
            text = "\\".join(str(v) for v in value)
        else:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        found.update(piece.strip() for piece in _PIECES.split(text)
                     if len(piece.strip()) >= 3 and piece.strip().isprintable())
    return found


def _frame_to_image(frame: np.ndarray, ds: Dataset, index: int) -> Image.Image:

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _COLOR_PHOTOMETRICS or frame.ndim == 3:
        return Image.fromarray(_color_to_uint8(frame, ds, photometric))
    gray = _gray_to_unit(frame, _frame_view(ds, index))
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray  # MONOCHROME1 stores low values as white; we want higher = brighter
    return Image.fromarray(_unit_to_uint8(gray))


def _color_to_uint8(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    # iter_pixels already converts YBR_FULL/YBR_FULL_422 to RGB (and JPEG decoders YBR_ICT/RCT).

    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
    if frame.dtype == np.uint8:
        return frame
    return _unit_to_uint8(_min_max(frame))


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """A dataset with the elements pydicom's LUT helpers read, as they apply to frame `index`."""

    view = Dataset()
    view.file_meta = ds.file_meta  # the helpers read LUT byte order from it
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    groups = list(ds.get("SharedFunctionalGroupsSequence") or [])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if index < len(per_frame):
        groups.append(per_frame[index])  # later wins: per-frame values override shared ones
    for group in groups:
        for sequence in _FRAME_GROUP_SEQUENCES:
            for item in group.get(sequence) or []:
                for keyword in _LUT_KEYWORDS:
                    if keyword in item:
                        setattr(view, keyword, item[keyword].value)
    return view


def _gray_to_unit(frame: np.ndarray, view: Dataset) -> np.ndarray:
    """Stored values -> [0, 1] display values: modality LUT/rescale, then VOI LUT or window."""

    values = apply_rescale(frame, view)
    if view.get("VOILUTSequence"):
        return _apply_voi_lut_sequence(values, view)
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        try:
            return _apply_window(values, view)
        except ValueError:
            pass  # a malformed window (e.g. width 0): fall back to the frame's own range
    return _min_max(np.asarray(values))


def _apply_window(values: np.ndarray, view: Dataset) -> np.ndarray:

    # apply_windowing maps the window onto a range it derives from BitsStored, the signedness
    # and the rescale; windowing -inf and +inf asks it for that range's two ends.
    low, high = apply_windowing(np.array([-np.inf, np.inf]), view)
    windowed = apply_windowing(values, view)
    return (windowed - low) / (high - low) if high > low else np.zeros_like(windowed)


def _apply_voi_lut_sequence(values: np.ndarray, view: Dataset) -> np.ndarray:

    if not np.issubdtype(values.dtype, np.integer):
        values = np.rint(values).astype(np.int64)  # a LUT is indexed by integer values
    out = apply_voi(values, view)
    depth = int(view.VOILUTSequence[0].LUTDescriptor[2])  # bits per LUT entry
    return out.astype(np.float64) / (2**depth - 1)


def _min_max(values: np.ndarray) -> np.ndarray:
    # No window in the file: stretch the frame's own range, as viewers do by default.

    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = float(finite.min()), float(finite.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:

    scaled = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
    return np.clip(scaled.round(), 0, 255).astype(np.uint8)


# --- archives ---------------------------------------------------------------------------------

_FILE, _DIR, _LINK, _DEVICE, _OTHER = "file", "directory", "link", "device", "other"
_READ_CHUNK = 1024**2  # archive members are read this much at a time


@dataclass(frozen=True)
class _Member:
    """An archive entry, the same for zip and tar."""

    name: str
    kind: str  # _FILE, _DIR, _LINK, _DEVICE or _OTHER
    size: int  # declared uncompressed size; may lie
    open: Callable[[], IO[bytes]]


class _StopExpanding(Exception):
    """A limit for the whole archive was reached; carries the error item that says so."""

    def __init__(self, item: SourceImage) -> None:
        super().__init__(item.error)
        self.item = item


def _expand_archive(name: str, source: _Guarded, limits: SourceLimits) -> Iterator[SourceImage]:
    try:
        if needs_random_access(name):
            with zipfile.ZipFile(source) as archive:
                yield from _expand_members(_zip_members(archive), limits)
        else:
            # "r|*": members in order from a forward-only stream, any compression; a tar on S3
            # is read in a few large requests and never held whole
            with tarfile.open(fileobj=source, mode="r|*") as archive:
                yield from _expand_members(_tar_members(archive), limits)
    except _StopExpanding as stop:
        yield stop.item
    except _ARCHIVE_ERRORS as exc:
        # Unreadable from the start, or corrupt part-way (tar): what was expanded stays.
        yield _failure(None, "", f"unreadable archive: {_describe(exc)}")


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        yield _Member(info.filename, _zip_kind(info), info.file_size, partial(archive.open, info))


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return _DIR
    mode = info.external_attr >> 16  # Unix mode bits, set by zips made on Unix
    if stat.S_ISLNK(mode):
        return _LINK
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return _DEVICE
    return _FILE


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    # Headers are read lazily: a corrupt tail raises here, mid-expansion.
    while (info := archive.next()) is not None:
        yield _Member(info.name, _tar_kind(info), info.size, partial(archive.extractfile, info))
        # A TarFile remembers every header it has read, even from a stream; nothing here looks
        # back, so forget them and memory stays flat over 100,000 members.
        archive.members.clear()


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return _FILE
    if info.isdir():
        return _DIR
    if info.issym() or info.islnk():
        return _LINK
    if info.ischr() or info.isblk() or info.isfifo():
        return _DEVICE
    return _OTHER


@dataclass
class _Budget:
    members_left: int
    bytes_left: int
    pixels_left: int


def _expand_members(members: Iterable[_Member], limits: SourceLimits) -> Iterator[SourceImage]:
    """The images of every member, in order; raises _StopExpanding at an archive limit."""
    budget = _Budget(limits.max_members, limits.max_archive_bytes, limits.max_archive_pixels)
    for member in members:
        if budget.members_left == 0:
            raise _StopExpanding(_failure(member.name, "", (
                f"archive has more than {limits.max_members} members; stopped expanding")))
        budget.members_left -= 1
        for item in _expand_member(member, limits, budget):
            if item.image is not None:
                _spend_pixels(item, limits, budget)
            yield item


def _spend_pixels(item: SourceImage, limits: SourceLimits, budget: _Budget) -> None:
    pixels = item.image.width * item.image.height
    if pixels > budget.pixels_left:
        raise _StopExpanding(_failure(item.member, item.content_sha256, (
            f"archive decodes to more than {limits.max_archive_pixels} pixels; stopped "
            "expanding"), frame=item.frame, dicom=item.dicom))
    budget.pixels_left -= pixels


def _expand_member(member: _Member, limits: SourceLimits,
                   budget: _Budget) -> Iterator[SourceImage]:
    if member.kind == _DIR or _is_os_metadata(member.name):
        return
    problem = _unsafe_reason(member)
    if problem:
        yield _failure(member.name, "", problem)
        return
    kind = _kind_by_name(member.name)
    if kind == _ARCHIVE:
        yield _failure(member.name, "", "nested archive not expanded")
        return
    try:
        data = _read_member(member, kind, limits, budget)
    except _ARCHIVE_ERRORS as exc:
        yield _failure(member.name, "", f"cannot read archive member: {_describe(exc)}")
        return
    if isinstance(data, str):
        if data:  # "" = not an image, skipped silently
            yield _failure(member.name, "", data)
        return
    yield from _expand_file(kind, data, member.name, limits)


def _is_os_metadata(path: str) -> bool:
    # macOS adds __MACOSX/ folders and "._name" AppleDouble files next to every real file; they
    # carry image extensions but no image, and would otherwise each be reported as an error.
    parts = re.split(r"[\\/]", path)
    return "__MACOSX" in parts or parts[-1].startswith("._")


def _unsafe_reason(member: _Member) -> str:
    """Why a member is refused without being read; "" when it is a safe regular file."""
    if member.kind == _LINK:
        return "symbolic or hard link member not followed"
    if member.kind == _DEVICE:
        return "device or fifo member refused"
    if member.kind != _FILE:
        return "unsupported archive member type"
    if member.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member.name):
        return "absolute member path refused"
    if ".." in re.split(r"[\\/]", member.name):
        return "member path with '..' refused"
    return ""


def _read_member(member: _Member, kind: str | None, limits: SourceLimits,
                 budget: _Budget) -> bytes | str:
    """The member's bytes, or a reason it was not read ("" = skip silently, not an image)."""
    with member.open() as stream:
        head = b""
        if kind is None:
            # Unknown extension: DICOM files are often stored without one, so sniff the magic.
            head = stream.read(_MAGIC_END)
            if not _has_dicom_magic(head):
                return ""
        if member.size > limits.max_member_bytes:
            return (f"member declares {member.size} bytes uncompressed, over the limit of "
                    f"{limits.max_member_bytes}")
        if member.size > budget.bytes_left:
            raise _archive_full(member, limits)
        # Headers can lie: never read more than the limit, whatever the size field said. Read in
        # chunks: zipfile inflates as much as one read() asks for before it checks the declared
        # size, so a single read would inflate a lying bomb up to the limit in memory.
        chunks, total = [head], len(head)
        while total <= limits.max_member_bytes:
            chunk = stream.read(min(_READ_CHUNK, limits.max_member_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
    if len(data) > limits.max_member_bytes:
        return f"member is larger than the limit of {limits.max_member_bytes} bytes"
    if len(data) > budget.bytes_left:
        raise _archive_full(member, limits)
    budget.bytes_left -= len(data)
    return data


def _archive_full(member: _Member, limits: SourceLimits) -> _StopExpanding:
    return _StopExpanding(_failure(member.name, "", (
        f"archive expands to more than {limits.max_archive_bytes} bytes; stopped expanding")))
