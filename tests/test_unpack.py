"""Tests for brainray.unpack: plain images, DICOM decoding and safe archive expansion."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence

from brainray import unpack
from brainray.config import IMAGE_EXTENSIONS
from brainray.unpack import (
    ARCHIVE_SUFFIXES,
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    SourceImage,
    SourceLimits,
    expand,
    is_supported,
)

_REPO = str(Path(__file__).resolve().parents[1])

# --- builders ---------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png(value: int = 128, size: tuple[int, int] = (6, 4)) -> bytes:
    return _encode(Image.new("L", size, value), "PNG")


def _jpeg(value: int = 128, size: tuple[int, int] = (16, 16)) -> bytes:
    return _encode(Image.new("RGB", size, (value, value, value)), "JPEG")


def _dataset(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits: int = 16,
             **elements) -> Dataset:
    """An MR image dataset with file meta; pixels (rows, cols[, 3]) or (frames, rows, cols)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = uid.MRImageStorage
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.Modality = "MR"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray | None, **kwargs) -> bytes:
    return _save(_dataset(pixels, **kwargs))


def _compressed_dicom(transfer_syntax: uid.UID, frames: int = 1) -> bytes:
    """A DICOM declaring a compressed transfer syntax whose encapsulated frames are garbage."""
    ds = _dataset(None, Rows=8, Columns=8, SamplesPerPixel=1, BitsAllocated=8, BitsStored=8,
                  HighBit=7, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"] * frames)
    ds["PixelData"].VR = "OB"
    return _save(ds)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w",
         special: tuple[tarfile.TarInfo, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in special:
            archive.addfile(info)
    return buffer.getvalue()


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _errors(items: list[SourceImage]) -> dict[str | None, str]:
    return {item.member: item.error for item in items if item.error}


def _ok(items: list[SourceImage]) -> list[SourceImage]:
    return [item for item in items if not item.error]


def _expand(name: str, data: bytes, limits: SourceLimits | None = None) -> list[SourceImage]:
    """Everything `expand` yields for these bytes, read from an in-memory file."""
    return list(expand(name, io.BytesIO(data), limits or SourceLimits()))


# --- names ------------------------------------------------------------------------------------


def test_image_suffixes_match_the_training_image_extensions():
    # given the extensions training accepts / when compared with the scoring list / then equal
    assert IMAGE_SUFFIXES == tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
    assert all(s == s.lower() and s.startswith(".") for s in
               IMAGE_SUFFIXES + DICOM_SUFFIXES + ARCHIVE_SUFFIXES)


@pytest.mark.parametrize(("name", "supported"), [
    ("scan.PNG", True), ("a/b/scan.jpeg", True), ("s3://bucket/series/IM1.DCM", True),
    ("x.dicom", True), ("batch.zip", True), ("batch.tar", True), ("batch.TAR.GZ", True),
    ("batch.tgz", True), ("notes.txt", False), ("volume.nii.gz", False), ("IM0001", False),
])
def test_is_supported_by_extension_case_insensitively(name, supported):
    # given a name / when checked / then only image, DICOM and archive extensions are supported
    assert is_supported(name) is supported


# --- plain images -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data"), [("scan.png", _png()), ("scan.JPG", _jpeg())])
def test_plain_image_gives_one_ok_item_with_the_file_sha(name, data):
    # when a plain image is expanded
    items = _expand(name, data)
    # then it is one decoded image carrying the sha of the file's bytes
    assert len(items) == 1
    item = items[0]
    assert item.error == "" and item.ok
    assert item.member is None and item.frame is None
    assert item.content_sha256 == _sha(data)
    assert item.image is not None and item.image.size in {(6, 4), (16, 16)}


def test_animated_gif_gives_its_first_frame_only():
    # given a two-frame GIF whose frames differ
    frames = [Image.new("L", (4, 4), 10), Image.new("L", (4, 4), 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    # when expanded
    items = _expand("anim.gif", buffer.getvalue())
    # then one image holding frame 0
    assert len(items) == 1 and items[0].ok
    assert items[0].image.convert("L").getpixel((0, 0)) == 10


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("truncated.jpg", _jpeg(size=(64, 64))[:120], "not a decodable image"),
    ("empty.png", b"", "empty file"),
    ("text.png", b"this is not a png", "not a decodable image"),
])
def test_undecodable_image_is_an_error_item_not_an_exception(name, data, reason):
    # when broken image bytes are expanded
    items = _expand(name, data)
    # then one error item with a readable reason and the sha of what was read
    assert len(items) == 1
    assert items[0].image is None and reason in items[0].error
    assert items[0].content_sha256 == _sha(data)


def test_image_over_the_pixel_limit_is_refused():
    # given a limit below the image's size / when expanded / then an error item
    items = _expand("big.png", _png(size=(100, 100)), SourceLimits(max_image_pixels=99 * 99))
    assert items[0].image is None and "over the limit" in items[0].error


def test_unsupported_extension_is_an_error_item():
    # when a file of an unknown type is expanded / then one error item
    items = _expand("notes.txt", b"hello")
    assert [(item.member, item.error) for item in items] == [(None, "unsupported file type")]


# --- DICOM ------------------------------------------------------------------------------------


def test_dicom_rescale_then_window_maps_to_8_bit_gray():
    # given stored values 0 / 100 / 1000, rescaled by 2x - 100 to -100 / 100 / 1900,
    # and a window centered on 100 and 100 wide (50..150 after rescale)
    stored = np.full((8, 8), 100, dtype=np.uint16)
    stored[0, :] = 0
    stored[-1, :] = 1000
    stored[3, 0], stored[3, 1] = 80, 120  # inside the window: 60 and 140 after rescale
    data = _dicom(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=100,
                  WindowWidth=100)
    # when expanded
    items = _expand("slice.dcm", data)
    # then one 8-bit gray frame: below the window black, above white, the center mid-gray
    assert len(items) == 1 and items[0].ok
    assert items[0].frame == 0 and items[0].member is None
    assert items[0].content_sha256 == _sha(data)
    image = items[0].image
    assert image.mode == "L" and image.size == (8, 8)
    pixels = np.asarray(image)
    assert (pixels[0] == 0).all() and (pixels[-1] == 255).all()
    assert abs(int(pixels[4, 4]) - 128) <= 2
    assert 0 < pixels[3, 0] < pixels[4, 4] < pixels[3, 1] < 255


def test_dicom_without_window_is_min_max_scaled():
    # given a ramp of 12-bit-like values and no window
    stored = np.linspace(1000, 3000, 64).reshape(8, 8).astype(np.uint16)
    # when expanded / then the lowest value is black and the highest white
    pixels = np.asarray(_expand("ramp.dcm", _dicom(stored))[0].image)
    assert pixels.min() == 0 and pixels.max() == 255
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255


def test_monochrome1_is_inverted_so_higher_is_brighter():
    # given MONOCHROME1, where the lowest stored value is displayed white
    stored = np.linspace(0, 4000, 64).reshape(8, 8).astype(np.uint16)
    # when expanded
    pixels = np.asarray(_expand("cr.dcm", _dicom(stored, photometric="MONOCHROME1"))[0].image)
    # then the lowest stored value becomes 255 and the highest 0
    assert pixels[0, 0] == 255 and pixels[-1, -1] == 0


def test_multi_frame_dicom_gives_one_item_per_frame():
    # given three frames of different brightness
    frames = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (0, 500, 1000)])
    frames[:, 0, 0] = 0  # a shared minimum so each frame keeps its own level under min-max
    frames[:, 0, 1] = 1000
    data = _dicom(frames)
    # when expanded
    items = _expand("series.dcm", data)
    # then frames 0, 1, 2, all from the same file
    assert [item.frame for item in items] == [0, 1, 2]
    assert all(item.ok and item.content_sha256 == _sha(data) for item in items)
    levels = [np.asarray(item.image)[4, 4] for item in items]
    assert levels[0] < levels[1] < levels[2]


def test_enhanced_multi_frame_uses_per_frame_windows():
    # given two identical frames whose functional groups window them differently
    frames = np.full((2, 8, 8), 100, dtype=np.uint16)

    def window(center: int) -> Dataset:
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 50
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        return group

    data = _dicom(frames, PerFrameFunctionalGroupsSequence=Sequence([window(100), window(300)]))
    # when expanded
    items = _expand("enhanced.dcm", data)
    # then frame 0 (value at its window center) is mid-gray and frame 1 (below its window) black
    assert [item.frame for item in items] == [0, 1]
    assert abs(int(np.asarray(items[0].image)[0, 0]) - 128) <= 2
    assert np.asarray(items[1].image).max() == 0


def test_ybr_full_dicom_becomes_rgb():
    # given a colour DICOM stored as YBR_FULL
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[...] = (200, 30, 90)
    data = _dicom(convert_color_space(rgb, "RGB", "YBR_FULL"), photometric="YBR_FULL", bits=8)
    # when expanded / then an RGB image with the original colour (up to rounding)
    image = _expand("colour.dcm", data)[0].image
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - rgb).max() <= 2


def test_dicom_is_recognised_by_its_magic_without_an_extension():
    # given a DICOM named like scanners name them / when expanded / then it decodes
    items = _expand("IM0001", _dicom(np.arange(64, dtype=np.uint16).reshape(8, 8)))
    assert len(items) == 1 and items[0].ok and items[0].frame == 0


def test_raw_dicom_without_preamble_or_meta_reads_when_the_extension_says_dicom():
    # given a bare implicit-VR dataset: no preamble, no "DICM", no transfer syntax
    ds = _dataset(np.arange(64, dtype=np.uint16).reshape(8, 8))
    del ds.file_meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    # when expanded as .dcm / then it decodes; without the extension it is not taken as DICOM
    assert _expand("old.dcm", buffer.getvalue())[0].ok
    assert _expand("old", buffer.getvalue())[0].error == "unsupported file type"


def test_dicom_without_pixel_data_is_an_error_item():
    # given a DICOM with only header elements / when expanded / then the reason says so
    data = _dicom(None, PatientName="Anon")
    items = _expand("report.dcm", data)
    assert [(item.error, item.image) for item in items] == [("DICOM has no pixel data", None)]
    assert items[0].content_sha256 == _sha(data)


def test_compressed_dicom_without_a_decoder_names_the_transfer_syntax(monkeypatch):
    # given a node where JPEG Lossless SV1's decoders (the pylibjpeg plugins) are missing
    missing = SimpleNamespace(is_available=False, missing_dependencies=["pylibjpeg>=2.0"])
    monkeypatch.setattr(unpack, "get_decoder", lambda syntax: missing)
    items = _expand("lossless.dcm", _compressed_dicom(uid.JPEGLosslessSV1))
    # then one error item naming the transfer syntax, its UID and what to install
    assert len(items) == 1 and items[0].image is None
    assert "no decoder installed" in items[0].error and "pylibjpeg>=2.0" in items[0].error
    assert "JPEG Lossless" in items[0].error and str(uid.JPEGLosslessSV1) in items[0].error


def test_video_dicom_is_an_error_item_naming_the_transfer_syntax():
    # given MPEG-2 video, which pydicom has no decoder for at all / when expanded
    items = _expand("cine.dcm", _compressed_dicom(uid.MPEG2MPML))
    # then one error item saying the syntax is not supported
    assert len(items) == 1 and items[0].image is None
    assert "is not supported" in items[0].error and str(uid.MPEG2MPML) in items[0].error


def test_decoder_failures_log_nothing_from_pydicom(caplog):
    # given an undecodable JPEG 2000 frame, whose failure pydicom logs with a traceback
    data = _compressed_dicom(uid.JPEG2000Lossless)
    # when expanded with every log record captured
    with caplog.at_level(logging.DEBUG):
        items = _expand("broken.dcm", data)
    # then the failure is an error item, and no pydicom logger wrote a record (they can quote
    # header values, which may be patient data)
    assert items[0].image is None and "cannot decode DICOM pixel data" in items[0].error
    assert [r.name for r in caplog.records if r.name.startswith("pydicom")] == []


# The compressed transfer syntaxes of the files pydicom ships (read offline, from the package),
# with each file's (width, height): JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE.
_PYDICOM_COMPRESSED = [
    ("SC_rgb_jpeg_dcmtk.dcm", uid.JPEGBaseline8Bit, (100, 100)),
    ("JPGExtended.dcm", uid.JPEGExtended12Bit, (256, 1024)),
    ("SC_rgb_jpeg_gdcm.dcm", uid.JPEGLosslessSV1, (100, 100)),
    ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, (64, 64)),
    ("JPEGLSNearLossless_16.dcm", uid.JPEGLSNearLossless, (10, 50)),
    ("MR_small_jp2klossless.dcm", uid.JPEG2000Lossless, (64, 64)),
    ("JPEG2000.dcm", uid.JPEG2000, (256, 1024)),
    ("MR_small_RLE.dcm", uid.RLELossless, (64, 64)),
]


@pytest.mark.parametrize(("name", "syntax", "size"), _PYDICOM_COMPRESSED,
                         ids=[row[0] for row in _PYDICOM_COMPRESSED])
def test_compressed_dicom_decodes_to_an_image_of_its_size(name, syntax, size):
    # given one of pydicom's own test files, in the transfer syntax listed for it
    data = Path(get_testdata_file(name)).read_bytes()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    # when expanded / then one decoded frame of the file's width and height
    items = _expand(name, data)
    assert [(item.ok, item.frame, item.image.size) for item in items] == [(True, 0, size)]


@pytest.mark.parametrize(("syntax", "label"), [
    (uid.JPEGBaseline8Bit, "JPEG Baseline"), (uid.JPEG2000, "JPEG 2000"),
])
def test_compressed_dicom_with_corrupt_frames_names_the_transfer_syntax(syntax, label):
    # given a syntax Pillow decodes, with garbage in the encapsulated frame
    items = _expand("broken.dcm", _compressed_dicom(syntax))
    # then one error item for frame 0 naming the syntax, and no exception
    assert len(items) == 1 and items[0].image is None and items[0].frame == 0
    assert "cannot decode DICOM pixel data" in items[0].error and label in items[0].error


def test_jpeg_baseline_dicom_decodes_with_pillow():
    # given an 8-bit gray frame JPEG-encoded and encapsulated
    ds = _dataset(None, Rows=16, Columns=16, SamplesPerPixel=1, BitsAllocated=8, BitsStored=8,
                  HighBit=7, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.PixelData = encapsulate([_encode(Image.new("L", (16, 16), 60), "JPEG")])
    ds["PixelData"].VR = "OB"
    # when expanded / then it decodes into a 16x16 gray image
    items = _expand("jpeg.dcm", _save(ds))
    assert len(items) == 1 and items[0].ok and items[0].image.size == (16, 16)


def test_truncated_dicom_is_an_error_item():
    # given a DICOM cut short inside its pixel data
    data = _dicom(np.arange(256, dtype=np.uint16).reshape(16, 16))[:-100]
    # when expanded / then no image, an error, no exception
    items = _expand("cut.dcm", data)
    assert len(items) == 1 and items[0].image is None and items[0].error


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x01garbage" * 10, "not a readable DICOM file"),
    (_png(), "not a readable DICOM file"),
    (b"", "empty file (0 bytes)"),
])
def test_non_dicom_bytes_with_dicom_extension_are_an_error_item(data, reason):
    # when bytes that are no DICOM are expanded as .dcm (read with force=True)
    items = _expand("junk.dcm", data)
    # then one error item saying so, rather than a nonsense dataset "without pixel data"
    assert len(items) == 1 and items[0].image is None and reason in items[0].error


@pytest.mark.parametrize(("limits", "reason"), [
    (SourceLimits(max_image_pixels=63), "over the limit of 63"),
    (SourceLimits(max_frames=2), "3 frames, over the limit of 2"),
])
def test_dicom_limits_are_checked_before_decoding(limits, reason):
    # given a 3-frame 8x8 series and a limit it breaks / when expanded / then refused
    items = _expand("series.dcm", _dicom(np.zeros((3, 8, 8), dtype=np.uint16)), limits)
    assert len(items) == 1 and items[0].image is None and reason in items[0].error


# --- archives ---------------------------------------------------------------------------------


def test_zip_expands_its_images_and_skips_other_files():
    # given two images, a README and a folder entry
    first, second = _png(10), _jpeg(200)
    data = _zip({"scans/a.png": first, "scans/b.jpg": second, "README.txt": b"hi",
                 "empty/": b""})
    # when expanded
    items = _expand("batch.zip", data)
    # then one item per image, named by member, with the member's sha
    assert [(item.member, item.content_sha256, item.ok) for item in items] == [
        ("scans/a.png", _sha(first), True), ("scans/b.jpg", _sha(second), True)]
    assert all(item.frame is None for item in items)


@pytest.mark.parametrize(("name", "mode"), [
    ("batch.tar", "w"), ("batch.tar.gz", "w:gz"), ("batch.tgz", "w:gz"),
])
def test_tar_expands_its_images_and_skips_other_files(name, mode):
    # given a tar (plain or gzipped) of two images and a README
    first, second = _png(10), _png(250)
    data = _tar({"a.png": first, "sub/b.png": second, "README.txt": b"hi"}, mode)
    # when expanded / then one ok item per image, named by member
    items = _expand(name, data)
    assert [(item.member, item.content_sha256, item.ok) for item in items] == [
        ("a.png", _sha(first), True), ("sub/b.png", _sha(second), True)]


def test_dicom_members_expand_per_frame_and_are_sniffed_without_extension():
    # given a 2-frame DICOM with an extension and a single-frame one without
    series = _dicom(np.zeros((2, 8, 8), dtype=np.uint16))
    single = _dicom(np.zeros((8, 8), dtype=np.uint16))
    data = _zip({"s1/series.dcm": series, "s2/IM0001": single, "notes": b"x" * 200})
    # when expanded
    items = _expand("dicoms.zip", data)
    # then the frames of both, and the extensionless non-DICOM member skipped
    assert [(item.member, item.frame, item.ok) for item in items] == [
        ("s1/series.dcm", 0, True), ("s1/series.dcm", 1, True), ("s2/IM0001", 0, True)]
    assert items[2].content_sha256 == _sha(single)


def test_zip_members_escaping_the_archive_are_error_items():
    # given traversal and absolute member paths next to a good image
    data = _zip({"../../evil.jpg": _jpeg(), "/abs.jpg": _jpeg(), "C:/win.jpg": _jpeg(),
                 "ok.png": _png()})
    # when expanded
    items = _expand("evil.zip", data)
    # then each unsafe member is an error item and the good one still decodes
    errors = _errors(items)
    assert "'..'" in errors["../../evil.jpg"]
    assert "absolute" in errors["/abs.jpg"] and "absolute" in errors["C:/win.jpg"]
    assert [item.member for item in _ok(items)] == ["ok.png"]


def test_tar_links_devices_and_unsafe_paths_are_error_items():
    # given a symlink, a hard link, a character device, a fifo and a traversal path
    special = (_special("link.png", tarfile.SYMTYPE, "/etc/passwd"),
               _special("hard.png", tarfile.LNKTYPE, "ok.png"),
               _special("dev.png", tarfile.CHRTYPE), _special("pipe.png", tarfile.FIFOTYPE))
    data = _tar({"ok.png": _png(), "../up.png": _png(), "/root.png": _png()}, special=special)
    # when expanded
    items = _expand("evil.tar", data)
    # then one error item for each, nothing followed, and the good image decodes
    errors = _errors(items)
    assert "link" in errors["link.png"] and "link" in errors["hard.png"]
    assert "device" in errors["dev.png"] and "fifo" in errors["pipe.png"]
    assert "'..'" in errors["../up.png"] and "absolute" in errors["/root.png"]
    assert [item.member for item in _ok(items)] == ["ok.png"]
    assert all(item.content_sha256 == "" for item in items if item.error)


def test_zip_bomb_member_is_refused_without_inflating_it():
    # given a member of 32 MiB of zeros (a few KiB compressed) and a 1 MiB member limit
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.png", "w") as member:
            for _ in range(32):
                member.write(bytes(1024**2))
    data = buffer.getvalue()
    assert len(data) < 256 * 1024
    limits = SourceLimits(max_member_bytes=1024**2)
    # when expanded under tracemalloc
    tracemalloc.start()
    try:
        items = _expand("bomb.zip", data, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # then an error item for the member, and memory stayed far below the inflated size
    assert len(items) == 1 and items[0].member == "bomb.png" and items[0].image is None
    assert "over the limit" in items[0].error
    assert peak < 4 * 1024**2


def test_zip_member_lying_about_its_size_is_an_error_item():
    # given a 2 MiB member whose central directory claims 1000 bytes
    data = bytearray(_zip({"liar.png": bytes(2 * 1024**2)}))
    entry = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, entry + 24, 1000)  # uncompressed size field
    # when expanded with a 64 KiB member limit
    items = _expand("liar.zip", bytes(data), SourceLimits(max_member_bytes=64 * 1024))
    # then the member is refused (at most the limit is ever read), with no exception
    assert len(items) == 1 and items[0].member == "liar.png" and items[0].image is None
    assert items[0].error


def test_archive_total_bytes_limit_stops_with_one_error_item():
    # given three images and a total budget that fits only the first two
    images = {"a.png": _png(1), "b.png": _png(2), "c.png": _png(3), "d.png": _png(4)}
    budget = len(images["a.png"]) + len(images["b.png"])
    # when expanded
    items = _expand("many.zip", _zip(images), SourceLimits(max_archive_bytes=budget))
    # then the first two decode and one error item says expansion stopped at the third
    assert [item.member for item in _ok(items)] == ["a.png", "b.png"]
    assert [(item.member, "stopped expanding" in item.error) for item in items if item.error] \
        == [("c.png", True)]


def test_member_count_limit_stops_with_one_error_item():
    # given four members and a limit of two / when expanded
    data = _tar({f"{i}.png": _png(i) for i in range(4)})
    items = _expand("many.tar", data, SourceLimits(max_members=2))
    # then two images and one error item naming the limit
    assert [item.member for item in _ok(items)] == ["0.png", "1.png"]
    assert [item.error for item in items if item.error] == [
        "archive has more than 2 members; stopped expanding"]


@pytest.mark.parametrize("name", ["corrupt.zip", "corrupt.tar", "corrupt.tar.gz"])
def test_corrupt_archive_is_one_error_item(name):
    # when bytes that are no archive are expanded
    data = b"PK\x03\x04 definitely not an archive " * 4
    items = _expand(name, data)
    # then one error item for the whole archive
    assert len(items) == 1 and items[0].member is None and items[0].image is None
    assert "unreadable archive" in items[0].error
    assert items[0].content_sha256 == ""  # streamed, never read whole: no sha of its own


def test_truncated_tar_gz_keeps_what_was_read_and_reports_the_rest():
    # given a tar.gz cut short after its first member
    data = _tar({"a.png": _png(1), "b.png": bytes(200_000)}, "w:gz")
    items = _expand("cut.tar.gz", data[: len(data) // 2])
    # then the first image decodes and the damage is reported, without an exception
    assert [item.member for item in _ok(items)] == ["a.png"]
    assert any(item.error for item in items)


def test_nested_archive_is_an_error_item_and_siblings_still_expand():
    # given a zip holding a zip and an image
    data = _zip({"inner.zip": _zip({"x.png": _png()}), "inner.tgz": b"x", "top.png": _png()})
    # when expanded
    items = _expand("outer.zip", data)
    # then the nested archives are reported, not expanded, and the image decodes
    assert _errors(items) == {"inner.zip": "nested archive not expanded",
                              "inner.tgz": "nested archive not expanded"}
    assert [item.member for item in _ok(items)] == ["top.png"]


def test_broken_member_is_an_error_item_with_its_sha():
    # given a zip with a truncated JPEG next to a good PNG
    broken = _jpeg(size=(64, 64))[:100]
    items = _expand("mixed.zip", _zip({"bad.jpg": broken, "good.png": _png()}))
    # then the broken member is an error item carrying its own sha
    bad = next(item for item in items if item.member == "bad.jpg")
    assert bad.image is None and "not a decodable image" in bad.error
    assert bad.content_sha256 == _sha(broken)
    assert [item.member for item in _ok(items)] == ["good.png"]


def test_macos_metadata_members_are_skipped():
    # given the __MACOSX folder and AppleDouble files a Mac zip adds
    data = _zip({"a.png": _png(), "__MACOSX/._a.png": b"\x00\x05\x16\x07junk",
                 "._b.png": b"junk"})
    # when expanded / then only the real image remains, with no error items
    assert [(item.member, item.ok) for item in _expand("mac.zip", data)] == [("a.png", True)]


# --- streaming: lazy expansion, bounded memory -------------------------------------------------


class _CountingFile(io.BytesIO):
    """An in-memory file that counts the bytes read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def _noise_png(seed: int, size: int = 160) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "PNG")  # incompressible: the archive is as large


@pytest.mark.parametrize(("name", "build"), [
    ("many.tar", lambda m: _tar(m)), ("many.tar.gz", lambda m: _tar(m, "w:gz")),
    ("many.zip", _zip),
])
def test_the_first_image_comes_before_most_of_the_archive_is_read(name, build):
    # given an archive of 20 incompressible images
    data = build({f"{i:02d}.png": _noise_png(i) for i in range(20)})
    source = _CountingFile(data)
    # when the first image is taken from expand
    images = expand(name, source)
    first = next(images)
    # then it decoded after reading a small part of the archive: images are yielded as made
    assert first.ok and first.member == "00.png"
    assert source.bytes_read < len(data) / 4, (source.bytes_read, len(data))
    assert [item.member for item in images] == [f"{i:02d}.png" for i in range(1, 20)]


_PEAK_SCRIPT = """
import io, resource, zipfile
from PIL import Image
from brainray.unpack import expand
png = io.BytesIO()
Image.new("L", (3000, 3000)).save(png, "PNG")
archive = io.BytesIO()
with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
    for i in range(48):
        z.writestr(f"black_{i:02d}.png", png.getvalue())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ok = sum(item.ok for item in expand("black.zip", io.BytesIO(archive.getvalue())))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(archive.getvalue()), ok, (after - before) * 1024)
"""


def test_expanding_a_zip_of_large_images_holds_about_one_image():
    # given (in a fresh process, so its peak RSS is its own) a small zip of 48 black 3000x3000
    # PNGs: 9 MB each decoded, 432 MB together
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": _REPO})
    # when all its images are expanded (each dropped once counted)
    archive_bytes, ok, growth = (int(x) for x in done.stdout.split())
    # then every one decoded, and the peak RSS grew by a few images at most, not 48
    assert archive_bytes < 2 * 1024**2 and ok == 48
    assert growth < 4 * 9_000_000, f"peak RSS grew {growth / 2**20:.0f} MiB"


def test_archive_decoded_pixel_budget_stops_with_one_error_item():
    # given four 10x10 images and a budget of 250 decoded pixels
    data = _zip({f"{i}.png": _png(i, size=(10, 10)) for i in range(4)})
    # when expanded
    items = _expand("many.zip", data, SourceLimits(max_archive_pixels=250))
    # then two decode and the third (past 250 pixels) stops expansion with one error item
    assert [item.member for item in _ok(items)] == ["0.png", "1.png"]
    assert [(item.member, item.error) for item in items if item.error] == [
        ("2.png", "archive decodes to more than 250 pixels; stopped expanding")]


class _FailingFile(io.BytesIO):
    """A file whose reads fail after `good` bytes, as a dropped connection would."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.good:
            raise ConnectionError("storage went away")
        return super().read(size if size is not None and 0 <= size < self.good else self.good)


@pytest.mark.parametrize(("name", "build"), [("a.tar", lambda m: _tar(m)), ("a.zip", _zip)])
def test_a_failing_source_raises_its_own_error_instead_of_an_unreadable_archive_item(name,
                                                                                    build):
    # given an archive whose file fails part-way through
    data = build({f"{i}.png": _noise_png(i) for i in range(6)})
    source = _FailingFile(data, good=len(data) // 2)
    # when expanded / then the source's error reaches the caller (to fail the job, not the file)
    with pytest.raises(ConnectionError, match="storage went away"):
        list(expand(name, source))


def test_tar_stream_forgets_member_headers_as_it_goes(monkeypatch):
    # given a tar of 300 members, and every TarFile made while expanding it
    data = _tar({f"{i:03d}.txt": b"x" for i in range(299)} | {"last.png": _png()})
    opened: list[tarfile.TarFile] = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(real_open(*a, **k))
                        or opened[-1])
    # when expanded
    items = _expand("many.tar", data)
    # then the image is found, and the stream kept no list of the 300 headers
    assert [item.member for item in items] == ["last.png"]
    assert len(opened) == 1 and len(opened[0].members) <= 1
