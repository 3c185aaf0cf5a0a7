"""The scoring job end to end on the shared Ray cluster: folders, S3, archives, DICOM, bad files,
incremental runs and crashes part-way."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from brainray import publish
from brainray.checkpoint import make_checkpoint, model_from_checkpoint, serialize
from brainray.cli import run
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, ScoreConfig
from brainray.model import build_model
from brainray.score import _scorer_remote_args
from brainray.transforms import preprocess_bytes, to_model_input
from tests.conftest import encode, synthetic_scan, upload_tree, write_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IMAGE_SIZE = 32
COLUMNS = ["uri", "member", "frame", "content_sha256", "predicted_label", "confidence",
           *[f"prob_{c}" for c in DEFAULT_CLASSES], "needs_review", "model_id", "model_name",
           "scored_at", "status", "error", "source_size", "source_mtime_ns", "run_id",
           "out_of_distribution", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
           "modality", "series_description", "instance_number"]


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    """An untrained but fixed model: scoring must reproduce it exactly, trained or not."""
    torch.manual_seed(0)
    model = build_model("paper_cnn", 4, IMAGE_SIZE)
    payload = make_checkpoint(model, model_name="paper_cnn", classes=DEFAULT_CLASSES,
                              preprocess=PreprocessConfig(image_size=IMAGE_SIZE), config={},
                              metrics={}, epoch=1)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    path.write_bytes(serialize(payload))
    return path


def _images(n: int, offset: int = 0) -> dict[str, bytes]:
    return {f"scan_{offset + i:03d}.png": encode(synthetic_scan(i % 4, offset + i)) for i in
            range(n)}


def _dicom_bytes(frames: int = 1) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = (np.arange(frames * 256).reshape(frames, 16, 16) * 13 % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read_scores(output: Path) -> pd.DataFrame:
    return pq.read_table(output / "scores").to_pandas()


def _score(checkpoint, inputs, output, *extra) -> int:
    flags = [f for i in inputs for f in ("--input", str(i))]
    return run(["score", "--model", str(checkpoint), *flags, "--output", str(output),
                "--no-gpu", "--batch-size", "8", "--files-per-task", "4", *extra])


def test_scores_a_folder_with_archives_dicom_and_bad_files(ray_cluster, checkpoint_path,
                                                           tmp_path):
    # Given a folder of PNGs, a zip, a tar.gz, a 3-frame DICOM and four broken files
    images = _images(6)
    inside = _images(2, offset=50)
    files = {**{f"plain/{k}": v for k, v in images.items()},
             "archives/batch.zip": _zip({**{f"a/{k}": v for k, v in inside.items()},
                                         "README.txt": b"notes"}),
             "archives/batch.tar.gz": _tar(inside),
             "dicom/series.dcm": _dicom_bytes(frames=3),
             "bad/empty.png": b"", "bad/text.jpg": b"not a jpeg",
             "bad/truncated.png": images["scan_000.png"][:100],
             "bad/noise.png": bytes(np.random.default_rng(0).integers(0, 256, 500, np.uint8))}
    root = write_tree(tmp_path / "archive", files)
    output = tmp_path / "out"

    # When scoring the whole tree
    assert _score(checkpoint_path, [root], output) == 0

    # Then there is one row per image, frame and archive member, each with every column
    scores = _read_scores(output)
    assert list(scores.columns) == COLUMNS
    assert len(scores) == 6 + 2 + 2 + 3 + 4
    ok, errors = scores[scores.status == "ok"], scores[scores.status == "error"]
    assert len(ok) == 13 and len(errors) == 4
    assert errors.error.str.len().gt(0).all() and errors.predicted_label.isna().all()
    assert ok.error.isna().all() and ok.predicted_label.isin(DEFAULT_CLASSES).all()
    probs = ok[[f"prob_{c}" for c in DEFAULT_CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.allclose(ok.confidence, probs.max(1))
    assert (ok.needs_review == (ok.confidence < 0.7)).all()
    dicom = scores[scores.uri.str.endswith("series.dcm")]
    assert sorted(dicom.frame.tolist()) == [0, 1, 2] and dicom.member.isna().all()
    zipped = scores[scores.uri.str.endswith("batch.zip")]
    assert sorted(zipped.member) == ["a/scan_050.png", "a/scan_051.png"]
    assert scores.model_id.nunique() == 1 and (scores.model_name == "paper_cnn").all()
    assert scores.run_id.nunique() == 1
    assert str(scores.scored_at.dtype).startswith("datetime64") and "UTC" in str(
        scores.scored_at.dtype)

    # And predictions equal the model applied directly to the same preprocessed tensors
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = model_from_checkpoint(checkpoint)
    plain = ok[ok.uri.str.contains("/plain/")].sort_values("uri")
    tensors = np.stack([preprocess_bytes(images[Path(u).name], PreprocessConfig(IMAGE_SIZE))
                        for u in plain.uri])
    with torch.inference_mode():
        expected = torch.softmax(model(to_model_input(torch.from_numpy(tensors))), 1).numpy()
    assert np.allclose(plain[[f"prob_{c}" for c in DEFAULT_CLASSES]].to_numpy(), expected,
                       atol=1e-5)
    assert plain.content_sha256.iloc[0] == __import__("hashlib").sha256(
        images[Path(plain.uri.iloc[0]).name]).hexdigest()

    # And the run is committed: manifest, _SUCCESS, no staging left behind
    assert (output / "_SUCCESS").exists() and not any((output / "_staging").glob("*"))


def test_incremental_rerun_scores_only_new_files(ray_cluster, checkpoint_path, tmp_path):
    # Given a folder that was scored once
    root = write_tree(tmp_path / "in", _images(5))
    output = tmp_path / "out"
    assert _score(checkpoint_path, [root], output) == 0

    # When it is scored again unchanged, and then after two new files arrive
    assert _score(checkpoint_path, [root], output) == 0
    unchanged = _read_scores(output)
    write_tree(root, _images(2, offset=100))
    assert _score(checkpoint_path, [root], output) == 0

    # Then nothing is scored twice and the new files are scored exactly once
    assert len(unchanged) == 5
    scores = _read_scores(output)
    assert len(scores) == 7 and scores.uri.is_unique
    assert scores.run_id.nunique() == 2


@pytest.mark.s3
def test_scores_an_s3_prefix_into_s3(ray_cluster, checkpoint_path, s3_bucket, s3_options):
    # Given images under an S3 prefix and the model in the same bucket
    client, bucket = s3_bucket
    input_uri = upload_tree(client, bucket, "archive/2026", _images(4))
    client.put_object(Bucket=bucket, Key="models/model.pt", Body=checkpoint_path.read_bytes())
    output = f"s3://{bucket}/scores-out"

    # When scoring with everything on S3
    code = run(["score", "--model", f"s3://{bucket}/models/model.pt", "--input", input_uri,
                "--output", output, "--no-gpu", "--s3-endpoint", s3_options.s3_endpoint,
                "--s3-region", "us-east-1"])

    # Then the committed Parquet in the bucket has one ok row per image with s3:// URIs
    assert code == 0
    files = publish.published_files(output, s3_options)
    assert len(files) >= 1
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_options.s3_endpoint.split("//")[1],
                           scheme="http", region="us-east-1")
    table = pq.read_table([f.removeprefix("s3://") for f in files], filesystem=fs)
    assert table.num_rows == 4
    assert all(u.startswith(f"{input_uri}/") for u in table["uri"].to_pylist())
    assert set(table["status"].to_pylist()) == {"ok"}


def test_crash_during_publish_is_rolled_forward_without_duplicates(ray_cluster, checkpoint_path,
                                                                   tmp_path, monkeypatch):
    # Given a scoring run that dies while copying its files into the published dataset
    root = write_tree(tmp_path / "in", _images(6))
    output = tmp_path / "out"
    real_copy = publish.storage.copy_file

    def failing_copy(*args, **kwargs):
        raise OSError("simulated crash during publish")

    monkeypatch.setattr(publish.storage, "copy_file", failing_copy)
    assert _score(checkpoint_path, [root], output, "--rows-per-file", "2") == 1
    assert not (output / "_manifest.json").exists()

    # When the next scheduled run starts
    monkeypatch.setattr(publish.storage, "copy_file", real_copy)
    assert _score(checkpoint_path, [root], output) == 0

    # Then the interrupted run is committed once and nothing is scored again
    scores = _read_scores(output)
    assert len(scores) == 6 and scores.uri.is_unique and scores.run_id.nunique() == 1


def test_killed_run_then_rerun_leaves_each_image_exactly_once(ray_cluster, checkpoint_path,
                                                             tmp_path):
    # Given a scoring job process that is killed (SIGKILL) while it is writing its output
    import ray

    root = write_tree(tmp_path / "in", _images(16))
    output = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "jobs.score", "--model", str(checkpoint_path), "--input",
               str(root), "--output", str(output), "--no-gpu", "--batch-size", "2",
               "--files-per-task", "1", "--rows-per-file", "1"]
    process = subprocess.Popen(command, env=env, cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = output / "_staging"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if staging.exists() and any(staging.rglob("*.parquet")):
            break
        time.sleep(0.05)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait()

    # When the job is run again
    assert _score(checkpoint_path, [root], output) == 0

    # Then every image is in the published output exactly once
    scores = _read_scores(output)
    assert killed, "the job finished before it could be killed part-way"
    assert len(scores) == 16 and scores.uri.is_unique


@pytest.mark.parametrize("use_gpu, explain_dir, expected", [
    (False, None, {"max_concurrency": 2}),
    (False, "review/", {}),  # Grad-CAM hooks keep state: one batch at a time
    (True, None, {}),
])
def test_cpu_scoring_actors_overlap_two_batches_unless_they_explain(use_gpu, explain_dir,
                                                                    expected):
    config = ScoreConfig(model="model.pt", inputs=("in",), output="out", use_gpu=use_gpu,
                         explain_review_dir=explain_dir)
    assert _scorer_remote_args(config) == expected


# --- overlapping runs, settings that change a row, the OOD flag -------------------------------


def _job(checkpoint, inputs, output, *extra) -> subprocess.Popen:
    """`python -m jobs.score` as its own process on this test cluster."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    flags = [f for i in inputs for f in ("--input", str(i))]
    return subprocess.Popen([sys.executable, "-m", "jobs.score", "--model", str(checkpoint),
                             *flags, "--output", str(output), "--no-gpu", "--batch-size", "8",
                             *extra], env=env, cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_together_on_one_output_leave_every_image_once(
        ray_cluster, checkpoint_path, tmp_path):
    # Given two scheduled runs whose inputs overlap, started at the same moment on one output
    shared = write_tree(tmp_path / "shared", _images(6))
    first_only = write_tree(tmp_path / "a", _images(3, offset=10))
    second_only = write_tree(tmp_path / "b", _images(3, offset=20))
    output = tmp_path / "out"
    jobs = [_job(checkpoint_path, [shared, first_only], output),
            _job(checkpoint_path, [shared, second_only], output)]
    results = [(job.wait(timeout=600), job.stderr.read()) for job in jobs]
    # Then each either committed or refused clearly because the other held the output
    for code, err in results:
        assert code == 0 or (code == 1 and "another brainray score run" in err), err
    # and when both are run again (the next night), every image is in the output exactly once
    assert _score(checkpoint_path, [shared, first_only], output) == 0
    assert _score(checkpoint_path, [shared, second_only], output) == 0
    scores = _read_scores(output)
    assert len(scores) == 12 and scores.uri.is_unique


def test_a_recalibrated_model_scores_everything_again(ray_cluster, checkpoint_path, tmp_path):
    # Given inputs scored by a model, and the same weights with a new temperature
    from brainray.checkpoint import deserialize, with_fields

    root = write_tree(tmp_path / "in", _images(4))
    output = tmp_path / "out"
    assert _score(checkpoint_path, [root], output) == 0
    recalibrated = tmp_path / "recalibrated.pt"
    recalibrated.write_bytes(serialize(with_fields(deserialize(checkpoint_path.read_bytes()),
                                                   temperature=2.5)))
    # When the recalibrated model runs incrementally, Then it scores every input again: its
    # rows differ (calibrated probabilities), so the old model's rows are not its rows
    assert _score(recalibrated, [root], output) == 0
    scores = _read_scores(output)
    assert len(scores) == 8 and scores.model_id.nunique() == 2


def test_an_explicit_review_threshold_is_a_setting_of_its_own(ray_cluster, checkpoint_path,
                                                               tmp_path):
    root = write_tree(tmp_path / "in", _images(3))
    output = tmp_path / "out"
    assert _score(checkpoint_path, [root], output) == 0
    assert _score(checkpoint_path, [root], output) == 0  # nothing new
    assert _score(checkpoint_path, [root], output, "--confidence-threshold", "0.9") == 0
    assert len(_read_scores(output)) == 6


def test_no_ood_check_writes_null_not_false(ray_cluster, checkpoint_path, tmp_path):
    root = write_tree(tmp_path / "in", _images(3))
    output = tmp_path / "out"
    assert _score(checkpoint_path, [root], output, "--no-ood-check") == 0
    assert _read_scores(output).out_of_distribution.isna().all()


def test_a_cpu_scoring_actor_takes_its_threads_from_the_node_it_runs_on(monkeypatch):
    # Given actors on a 16-core node and on a 2-core node (the driver's cores do not matter)
    from brainray import score

    for cores, concurrency, expected in ((16, 4, 4), (2, 1, 2), (2, 4, 1), (16, 1, 16)):
        monkeypatch.setattr(score.os, "cpu_count", lambda c=cores: c)
        assert score.actor_threads(0, concurrency) == expected
    assert score.actor_threads(3, 4) == 3  # --threads-per-actor wins


# Patient-identifying attributes of the DICOM basic de-identification profile (PS3.15 E.1), each
# with a value that cannot occur by chance in an output file or a log.
_PATIENT_DATA = {
    "PatientName": "Quagmire^Glenda^Marigold", "PatientID": "PID-77341-XQ",
    "PatientBirthDate": "19470312", "PatientAddress": "42 Wallaby Way Springfield",
    "OtherPatientIDs": "ALTPID-99812", "PatientTelephoneNumbers": "555-0199-3217",
    "ReferringPhysicianName": "Hibbert^Julius^Ezekiel", "InstitutionName": "Shelbyville General",
    "AccessionNumber": "ACC-555-10-Z", "PatientComments": "allergic to penicillin zq",
}


def _dicom_with_patient_data(pixels: bool = True, corrupt: bool = False) -> bytes:
    """A DICOM full of patient data: an image, one without pixel data, or one whose compressed
    frame is garbage (so that decoding fails and writes an error message)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = dcmread(io.BytesIO(_dicom_bytes()))
    for keyword, value in _PATIENT_DATA.items():
        setattr(ds, keyword, value)
    if corrupt:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 " + _PATIENT_DATA["PatientID"].encode()])
        ds["PixelData"].VR = "OB"
    elif not pixels:
        del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _texts(root: Path, since: float) -> dict[str, str]:
    """Every file under root changed since `since`, as text; Parquet also as its decoded rows
    and metadata (its pages may be compressed)."""
    texts = {}
    for path in (p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since):
        text = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            text += repr(table.to_pylist()) + repr(table.schema.metadata)
        texts[str(path)] = text
    return texts


def test_no_patient_data_reaches_the_output_or_the_logs(ray_cluster, checkpoint_path, tmp_path,
                                                        capfd):
    # Given DICOMs full of patient data: extensionless, one without pixels, one undecodable
    import ray

    started = time.time() - 1
    root = write_tree(tmp_path / "in", {
        "IM0001": _dicom_with_patient_data(), "IM0002": _dicom_with_patient_data(pixels=False),
        "IM0003": _dicom_with_patient_data(corrupt=True),
        "bundle.zip": _zip({"IM0004": _dicom_with_patient_data(corrupt=True)})})
    output = tmp_path / "out"
    # When they are scored
    assert _score(checkpoint_path, [root], output) == 0
    time.sleep(2)  # worker output reaches the driver's log stream with a delay
    # Then the rows are there (one ok, three errors) ...
    scores = _read_scores(output)
    assert sorted(scores.status) == ["error", "error", "error", "ok"]
    # ... and no patient value is in any output file, the console or Ray's logs
    captured = capfd.readouterr()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts = {"stdout": captured.out, "stderr": captured.err, **_texts(output, 0),
             **_texts(logs, started)}
    leaks = [(name, value) for name, text in texts.items() for value in _PATIENT_DATA.values()
             if value in text or value.replace("^", " ") in text]
    assert not leaks
