"""The scoring read step without Ray: listing inputs (DICOM found by content, DICOMDIRs set
aside) and `read_and_preprocess` (archives streamed from storage, DICOM identity columns)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import uid

from brainray import storage
from brainray.config import PreprocessConfig, StorageOptions
from brainray.presets import InferencePreset
from brainray.score import list_inputs, read_and_preprocess
from brainray.unpack import SourceLimits
from tests.conftest import encode, write_tree
from tests.test_unpack import _dataset, _dicom, _noise_png, _save, _tar, _zip

IMAGE_SIZE = 32


class _Sent:
    """Stands in for brainray.console.Events (a Ray queue): keeps what the step sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, kind: str, payload) -> None:
        self.sent.append((kind, payload))


def _read(paths: list[Path], limits: SourceLimits | None = None, max_file_bytes: int = 2**31,
          events: _Sent | None = None) -> dict[str, list]:
    """The rows `read_and_preprocess` makes of these files, as lists per column."""
    batch = {"uri": np.array([str(p) for p in paths], dtype=object),
             "size": np.array([p.stat().st_size for p in paths]),
             "mtime_ns": np.array([p.stat().st_mtime_ns for p in paths])}
    blocks = list(read_and_preprocess(
        batch, options=StorageOptions(),
        preset=InferencePreset(PreprocessConfig(image_size=IMAGE_SIZE)),
        limits=limits or SourceLimits(), max_file_bytes=max_file_bytes, events=events))
    return {k: [x for block in blocks for x in block[k]] for k in (blocks[0] if blocks else {})}


def _dicomdir() -> bytes:
    """A minimal DICOMDIR: the file meta names the Media Storage Directory SOP class."""
    ds = _dataset(None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = uid.MediaStorageDirectoryStorage
    return _save(ds)


# --- listing ----------------------------------------------------------------------------------


def test_extensionless_dicom_files_in_a_folder_are_found_by_their_marker(tmp_path):
    # given PACS-style DICOM names (no extension) beside a non-DICOM file without one
    dicom = _dicom(np.zeros((8, 8), dtype=np.uint16))
    write_tree(tmp_path, {"s1/IM0001": dicom, "s1/1.2.840.113619.2.55.3": dicom,
                          "s1/notes": b"x" * 300, "s1/VERSION": b"1", "a.png": encode(
                              Image.new("L", (8, 8)))})
    # when listed / then both DICOMs and the image are inputs, the others are not
    listing = list_inputs((str(tmp_path),), StorageOptions())
    assert [Path(f["uri"]).relative_to(tmp_path).as_posix() for f in listing.files] == [
        "a.png", "s1/1.2.840.113619.2.55.3", "s1/IM0001"]


def test_a_dicomdir_is_set_aside_and_counted_not_listed(tmp_path):
    # given a DICOM file-set: its DICOMDIR index and one image
    write_tree(tmp_path, {"DICOMDIR": _dicomdir(),
                          "IMAGES/IM0001": _dicom(np.zeros((8, 8), dtype=np.uint16))})
    # when listed
    listing = list_inputs((str(tmp_path),), StorageOptions())
    # then the image is an input and the DICOMDIR is reported apart
    assert [f["uri"] for f in listing.files] == [str(tmp_path / "IMAGES/IM0001")]
    assert listing.dicomdirs == [str(tmp_path / "DICOMDIR")]


def test_a_dicom_image_named_dicomdir_is_still_an_input(tmp_path):
    # given an image DICOM that happens to be called DICOMDIR (its SOP class says MR image)
    write_tree(tmp_path, {"DICOMDIR": _dicom(np.zeros((8, 8), dtype=np.uint16))})
    # when listed / then it is scored, not set aside
    listing = list_inputs((str(tmp_path),), StorageOptions())
    assert [f["uri"] for f in listing.files] == [str(tmp_path / "DICOMDIR")]
    assert listing.dicomdirs == []


def test_files_already_scored_are_left_out_and_counted(tmp_path):
    # given two images, one of them scored before at its current size and mtime
    write_tree(tmp_path, {"a.png": encode(Image.new("L", (8, 8))),
                          "b.png": encode(Image.new("L", (8, 9)))})
    done = tmp_path / "a.png"
    scored = {(str(done), done.stat().st_size, done.stat().st_mtime_ns)}
    # when listed / then only the other is to score
    listing = list_inputs((str(tmp_path),), StorageOptions(), scored)
    assert [f["uri"] for f in listing.files] == [str(tmp_path / "b.png")]
    assert listing.already_scored == 1


# --- archives: streamed, bounded by the archive limits -----------------------------------------


@pytest.mark.parametrize(("name", "build"), [
    ("big.tar.gz", lambda m: _tar(m, "w:gz")), ("big.zip", _zip)])
def test_an_archive_over_the_file_size_limit_is_streamed_and_scored(tmp_path, monkeypatch, name,
                                                                     build):
    # given an archive of 8 incompressible images, 30x bigger than the per-file memory limit,
    # and storage that refuses to read any file whole
    path = tmp_path / name
    path.write_bytes(build({f"{i}.png": _noise_png(i) for i in range(8)}))
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("read whole"))
    # when read / then every image is an ok row
    rows = _read([path], max_file_bytes=path.stat().st_size // 30)
    assert rows["member"] == [f"{i}.png" for i in range(8)]
    assert set(rows["status"]) == {"ok"}


def test_a_plain_file_over_the_file_size_limit_is_an_error_row(tmp_path):
    # given a PNG larger than the limit (it would be read whole) / when read
    path = tmp_path / "big.png"
    path.write_bytes(_noise_png(0))
    rows = _read([path], max_file_bytes=100)
    # then one error row saying so
    assert rows["status"] == ["error"] and "over the limit of 100" in rows["error"][0]


def test_a_zip_of_large_black_pngs_stops_at_the_decoded_pixel_budget(tmp_path):
    # given 40 black 2000x2000 PNGs (a few KiB each, 4 Mpixel decoded) and a 10 Mpixel budget
    black = encode(Image.new("L", (2000, 2000)))
    path = tmp_path / "black.zip"
    path.write_bytes(_zip({f"{i:02d}.png": black for i in range(40)}))
    # when read
    rows = _read([path], SourceLimits(max_archive_pixels=10_000_000))
    # then two images are scored; the third, past the budget, is one error row and ends it
    assert rows["member"] == ["00.png", "01.png", "02.png"]
    assert rows["status"] == ["ok", "ok", "error"]
    assert rows["error"][2] == ("archive decodes to more than 10000000 pixels; "
                                "stopped expanding")


class _BreaksHalfway(io.BytesIO):
    """A storage stream that fails part-way, as an object deleted while it is read would."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > len(self.getbuffer()) // 2:
            raise storage.StorageError("s3://bucket/a.tar: read failed: NoSuchKey")
        return super().read(min(size, 4096) if size and size > 0 else 4096)


def test_an_archive_failing_part_way_keeps_its_rows_and_ends_with_an_error_row(tmp_path,
                                                                               monkeypatch):
    # given a tar whose stream fails after about half of it
    path = tmp_path / "a.tar"
    data = _tar({f"{i}.png": _noise_png(i) for i in range(8)})
    path.write_bytes(data)
    monkeypatch.setattr(storage, "open_stream", lambda uri, options: _BreaksHalfway(data))
    # when read
    rows = _read([path])
    # then the images before the failure are ok rows and one last row says the rest is missing
    assert set(rows["status"][:-1]) == {"ok"} and 2 <= len(rows["status"]) - 1 < 8
    assert rows["status"][-1] == "error" and rows["member"][-1] is None
    assert rows["error"][-1].startswith("read failed part-way") and "NoSuchKey" in rows["error"][-1]


def test_a_file_unreadable_when_opened_gets_no_row_and_is_retried(tmp_path):
    # given a listed archive that is gone by the time it is read
    path = tmp_path / "gone.zip"
    path.write_bytes(_zip({"a.png": _noise_png(0)}))
    stat, sent = path.stat(), _Sent()
    path.unlink()
    batch = {"uri": np.array([str(path)], dtype=object), "size": np.array([stat.st_size]),
             "mtime_ns": np.array([stat.st_mtime_ns])}
    # when read
    blocks = list(read_and_preprocess(
        batch, options=StorageOptions(),
        preset=InferencePreset(PreprocessConfig(image_size=IMAGE_SIZE)),
        limits=SourceLimits(), max_file_bytes=2**31, events=sent))
    # then no row (any row would mark it scored in the index) and a retry for the next run
    assert blocks == []
    assert [(kind, payload["uri"]) for kind, payload in sent.sent if kind == "retry"] == [
        ("retry", str(path))]


# --- DICOM identity columns -------------------------------------------------------------------


def test_dicom_rows_carry_their_study_series_and_instance(tmp_path):
    # given a 2-frame DICOM with its identity elements
    path = tmp_path / "IM0007"
    path.write_bytes(_dicom(np.zeros((2, 8, 8), dtype=np.uint16), StudyInstanceUID="1.2.3",
                            SeriesInstanceUID="1.2.3.4", SOPInstanceUID="1.2.3.4.7",
                            SeriesDescription="AX T1 POST", InstanceNumber="7"))
    # when read / then both frames' rows carry them
    rows = _read([path])
    assert rows["frame"] == [0, 1]
    for column, value in [("study_instance_uid", "1.2.3"), ("series_instance_uid", "1.2.3.4"),
                          ("sop_instance_uid", "1.2.3.4.7"), ("modality", "MR"),
                          ("series_description", "AX T1 POST"), ("instance_number", 7)]:
        assert rows[column] == [value, value], column


def test_non_dicom_rows_have_null_dicom_columns(tmp_path):
    # given a PNG / when read / then its DICOM columns are empty
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("L", (8, 8))))
    rows = _read([path])
    assert [rows[c][0] for c in ("study_instance_uid", "series_instance_uid",
                                 "sop_instance_uid", "modality", "series_description",
                                 "instance_number")] == [None] * 6


# --- patient data ------------------------------------------------------------------------------


def test_no_patient_data_reaches_the_rows_or_the_logs_without_ray(tmp_path, caplog, capfd):
    # given DICOMs full of patient data (readable, without pixels, undecodable, in a zip) and a
    # model; tests/test_score.py checks the same through a whole Ray run
    import logging

    import torch

    from brainray import publish
    from brainray.checkpoint import make_checkpoint, serialize
    from brainray.config import DEFAULT_CLASSES
    from brainray.model import build_model
    from brainray.score import Scorer
    from tests.test_score import _PATIENT_DATA, _dicom_with_patient_data

    root = write_tree(tmp_path / "in", {
        "IM0001": _dicom_with_patient_data(), "IM0002": _dicom_with_patient_data(pixels=False),
        "IM0003": _dicom_with_patient_data(corrupt=True),
        "bundle.zip": _zip({"IM0004": _dicom_with_patient_data(corrupt=True)})})
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    model.write_bytes(serialize(make_checkpoint(
        build_model("paper_cnn", 4, IMAGE_SIZE), model_name="paper_cnn", classes=DEFAULT_CLASSES,
        preprocess=PreprocessConfig(image_size=IMAGE_SIZE), config={}, metrics={}, epoch=1)))
    # when listed, read, scored and shaped into published rows, every log record captured
    with caplog.at_level(logging.DEBUG):
        files = [Path(f["uri"]) for f in list_inputs((str(root),), StorageOptions()).files]
        scorer = Scorer(str(model), StorageOptions(), use_gpu=False, threshold=None)
        rows = _read(files)
        table = publish.output_table(scorer({k: np.array(v, dtype=object) if k != "image"
                                             else np.stack(v) for k, v in rows.items()}),
                                     classes=list(DEFAULT_CLASSES), model_id="m",
                                     model_name="paper_cnn", run_id="r")
    # then the four rows are there, and no patient value is in them or in any log or output
    assert sorted(table["status"].to_pylist()) == ["error", "error", "error", "ok"]
    captured = capfd.readouterr()
    text = (repr(table.to_pylist()) + captured.out + captured.err
            + "\n".join(record.getMessage() for record in caplog.records))
    assert [v for v in _PATIENT_DATA.values() if v in text or v.replace("^", " ") in text] == []
