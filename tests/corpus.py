"""A corpus of unusual and hostile scoring inputs, generated in code (no binaries in the repo).

Each `CorpusItem` is one file to put in an input tree (its path may hold bytes that are not UTF-8)
plus the rows scoring must produce for it: `ok` for legitimate files, however odd, and `error`
with a readable reason for broken or hostile ones. `symlink_loop` is built by `write_corpus`.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from brainray.config import DEFAULT_CLASSES, PreprocessConfig
from tests.conftest import encode, synthetic_scan

OK, ERROR = "ok", "error"


@dataclass(frozen=True)
class Row:
    member: str | None  # archive member, None for a plain file
    status: str  # "ok" or "error"
    error: str = ""  # a substring the error must contain (status "error" only)


@dataclass(frozen=True)
class CorpusItem:
    id: str
    path: bytes  # relative to the input root; bytes, so names need not be UTF-8
    build: Callable[[], bytes]
    rows: tuple[Row, ...]
    legit: bool  # a legitimate file (all rows ok) rather than a broken or hostile one


def write_checkpoint(path: Path, classes=DEFAULT_CLASSES, image_size: int = 32) -> Path:
    """A fixed, untrained paper_cnn checkpoint (small images keep scoring fast)."""
    import torch

    from brainray.checkpoint import make_checkpoint, serialize
    from brainray.model import build_model

    torch.manual_seed(0)
    model = build_model("paper_cnn", len(classes), image_size)
    payload = make_checkpoint(model, model_name="paper_cnn", classes=list(classes),
                              preprocess=PreprocessConfig(image_size=image_size), config={},
                              metrics={}, epoch=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize(payload))
    return path


# --- images -----------------------------------------------------------------------------------


def _scan(index: int, mode: str = "L", size: int = 40) -> Image.Image:
    return synthetic_scan(index % 4, 500 + index, size=size, mode=mode)


def png_16bit() -> bytes:
    pixels = (np.asarray(_scan(1), dtype=np.uint16) * 200 + 300).astype(np.uint16)
    image = Image.fromarray(pixels)  # mode I;16
    assert image.mode.startswith("I;16")
    return encode(image, "PNG")


def jpeg_cmyk() -> bytes:
    return encode(_scan(2, "RGB").convert("CMYK"), "JPEG")


def png_rgba() -> bytes:
    image = _scan(3, "RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return encode(image, "PNG")


def png_palette(transparent: bool = False) -> bytes:
    image = _scan(4, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 0} if transparent else {}))
    return buffer.getvalue()


def png_1x1() -> bytes:
    return encode(Image.new("L", (1, 1), 77), "PNG")


def gif_animated() -> bytes:
    frames = [_scan(i, "L").convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50,
                   loop=0)
    return buffer.getvalue()


def plain_png(index: int = 0) -> bytes:
    return encode(_scan(index), "PNG")


def plain_jpeg(index: int = 0, size: int = 64) -> bytes:
    return encode(_scan(index, "RGB", size=size), "JPEG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height 8-bit gray pixels (10 GB decoded)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + png_chunk(b"IEND", b""))


def random_bytes(n: int = 4096) -> bytes:
    return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- DICOM ------------------------------------------------------------------------------------


def _dicom_dataset(**elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = uid.MRImageStorage
    ds.SOPInstanceUID = uid.generate_uid(entropy_srcs=["brainray-corpus"])  # deterministic
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.Modality = "MR"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_ok() -> bytes:
    ds = _dicom_dataset()
    ds.set_pixel_data((np.arange(256).reshape(16, 16) * 11).astype(np.uint16), "MONOCHROME2", 12,
                      generate_instance_uid=False)
    return _dicom_bytes(ds)


def dicom_without_pixels() -> bytes:
    return _dicom_bytes(_dicom_dataset(PatientName="Anon^Report", StudyDescription="no image"))


def dicom_jpeg_ls() -> bytes:
    """A JPEG-LS Lossless DICOM: no decoder for it is installed here (gdcm, pylibjpeg, pyjpegls)."""
    ds = _dicom_dataset(Rows=8, Columns=8, SamplesPerPixel=1, BitsAllocated=8, BitsStored=8,
                        HighBit=7, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = uid.JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 JPEG-LS frame \xff\xd9"])
    ds["PixelData"].VR = "OB"
    return _dicom_bytes(ds)


# --- archives ---------------------------------------------------------------------------------


def zip_hostile() -> bytes:
    """Traversal, absolute and symlink members beside one good image."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("../../x.jpg", plain_jpeg(1))
        archive.writestr("/abs/evil.jpg", plain_jpeg(2))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("good.png", plain_png(3))
    return buffer.getvalue()


BOMB_BYTES = 600 * 1024**2  # over the 512 MiB member limit
# zlib.crc32(bytes(BOMB_BYTES)); constant, so the corpus needs no 600 MiB buffer to build
BOMB_CRC32 = 1735155412


def _zeros_deflate(total: int, chunk: int = 1024**2) -> bytes:
    """A raw deflate stream of `total` zero bytes in ~1 KiB per MiB, built in milliseconds.

    One MiB of zeros is compressed and full-flushed (a byte-aligned block sequence that refers to
    nothing before it), repeated, and closed with an empty final block.
    """
    assert total % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (total // chunk) + b"\x03\x00"


def _single_member_zip(name: str, payload: bytes, crc: int, declared_size: int) -> bytes:
    """A deflated one-member zip, written by hand so the declared size can be anything."""
    raw = name.encode()
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(payload),
                        declared_size, len(raw), 0) + raw
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(payload),
                          declared_size, len(raw), 0, 0, 0, 0, 0o644 << 16, 0) + raw
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central),
                      len(local) + len(payload), 0)
    return local + payload + central + end


def zip_bomb() -> bytes:
    """A real zip bomb: 600 KiB on disk, a member that inflates to 600 MiB of zeros."""
    return _single_member_zip("bomb.png", _zeros_deflate(BOMB_BYTES), BOMB_CRC32, BOMB_BYTES)


def zip_bomb_lying() -> bytes:
    """The same bomb, its headers claiming the member is only 1000 bytes."""
    return _single_member_zip("liar.png", _zeros_deflate(BOMB_BYTES), BOMB_CRC32, 1000)


def tar_devices() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, kind in (("dev.png", tarfile.CHRTYPE), ("disk.png", tarfile.BLKTYPE),
                           ("pipe.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.devmajor, info.devminor = kind, 1, 3
            archive.addfile(info)
        good = plain_png(5)
        info = tarfile.TarInfo("good.png")
        info.size = len(good)
        archive.addfile(info, io.BytesIO(good))
    return buffer.getvalue()


# --- the corpus -------------------------------------------------------------------------------


def _ok(item_id: str, path: bytes, build: Callable[[], bytes]) -> CorpusItem:
    return CorpusItem(item_id, path, build, (Row(None, OK),), legit=True)


def _bad(item_id: str, path: bytes, build: Callable[[], bytes], error: str) -> CorpusItem:
    return CorpusItem(item_id, path, build, (Row(None, ERROR, error),), legit=False)


LONG_NAME = b"long_" + b"n" * 241 + b".png"  # 250 bytes, near the 255-byte file name limit

CORPUS: tuple[CorpusItem, ...] = (
    # legitimate but unusual: scored
    _ok("png_16bit_gray", b"odd/gray16.png", png_16bit),
    _ok("jpeg_cmyk", b"odd/cmyk.jpg", jpeg_cmyk),
    _ok("png_rgba", b"odd/rgba.png", png_rgba),
    _ok("png_palette", b"odd/palette.png", png_palette),
    _ok("png_palette_transparent", b"odd/palette_t.png", lambda: png_palette(True)),
    _ok("png_1x1", b"odd/one_pixel.png", png_1x1),
    _ok("gif_animated", b"odd/animated.gif", gif_animated),
    _ok("non_utf8_name", b"odd/scan_\xff\xfe.png", lambda: plain_png(6)),
    _ok("long_name", b"odd/" + LONG_NAME, lambda: plain_png(7)),
    _ok("upper_case_extension", b"odd/SCAN.PNG", lambda: plain_png(8)),
    _ok("bmp", b"odd/scan.bmp", lambda: encode(_scan(9), "BMP")),
    _ok("webp", b"odd/scan.webp", lambda: encode(_scan(10, "RGB"), "WEBP")),
    _ok("dicom_16bit", b"odd/mr.dcm", dicom_ok),
    # broken or hostile: error rows
    _bad("zero_bytes", b"bad/empty.png", lambda: b"", "empty file (0 bytes)"),
    _bad("truncated_jpeg", b"bad/truncated.jpg", lambda: plain_jpeg(11)[:400],
         "not a decodable image"),
    _bad("truncated_png", b"bad/truncated.png", lambda: plain_png(12)[:300],
         "not a decodable image"),
    _bad("text_named_jpg", b"bad/notes.jpg", lambda: b"meeting notes, not a JPEG\n" * 20,
         "not a decodable image"),
    _bad("random_bytes_png", b"bad/noise.png", random_bytes, "not a decodable image"),
    _bad("png_decompression_bomb", b"bad/bomb.png", png_bomb, "image too large"),
    _bad("png_over_pixel_limit", b"bad/144mp.png", lambda: png_bomb(12_000, 12_000),
         "12000x12000 pixels, over the limit of 64000000"),
    _bad("dicom_without_pixels", b"bad/report.dcm", dicom_without_pixels,
         "DICOM has no pixel data"),
    _bad("dicom_jpeg_ls", b"bad/jpegls.dcm", dicom_jpeg_ls, "JPEG-LS"),
    _bad("text_named_dcm", b"bad/notes.dcm", lambda: b"not DICOM at all\n" * 20,
         "not a readable DICOM file"),
    _bad("random_bytes_zip", b"bad/corrupt.zip", random_bytes, "unreadable archive"),
    CorpusItem("zip_unsafe_members", b"bad/evil.zip", zip_hostile, (
        Row("../../x.jpg", ERROR, "member path with '..' refused"),
        Row("/abs/evil.jpg", ERROR, "absolute member path refused"),
        Row("link.png", ERROR, "link member not followed"),
        Row("good.png", OK)), legit=False),
    CorpusItem("zip_bomb", b"bad/bomb.zip", zip_bomb, (
        Row("bomb.png", ERROR, f"declares {BOMB_BYTES} bytes uncompressed, over the limit"),),
        legit=False),
    CorpusItem("zip_bomb_lying_size", b"bad/liar.zip", zip_bomb_lying, (
        Row("liar.png", ERROR, "cannot read archive member"),), legit=False),
    CorpusItem("tar_device_members", b"bad/devices.tar", tar_devices, (
        Row("dev.png", ERROR, "device or fifo member refused"),
        Row("disk.png", ERROR, "device or fifo member refused"),
        Row("pipe.png", ERROR, "device or fifo member refused"),
        Row("good.png", OK)), legit=False),
    # a folder whose symbolic links point back up the tree (written by write_corpus)
    _ok("symlink_loop", b"loop/inside.png", lambda: plain_png(13)),
)

CORPUS_IDS = [item.id for item in CORPUS]


def write_corpus(root: Path) -> None:
    """Write every corpus item under `root`, plus symlinks that loop back up the tree."""
    base = os.fsencode(root)
    for item in CORPUS:
        path = os.path.join(base, item.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(item.build())
    loop = os.path.join(base, b"loop")
    os.symlink(b"..", os.path.join(loop, b"up"))  # loop/up -> the input root
    os.symlink(b".", os.path.join(loop, b"here"))  # loop/here -> loop itself
    os.symlink(b"here", os.path.join(loop, b"again.png"))  # a file name that is a dir link
    os.symlink(b"self.png", os.path.join(loop, b"self.png"))  # a link to itself (ELOOP)
