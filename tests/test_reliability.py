"""Faults and trust: object storage misbehaving (through tests/faultproxy.py), unusable outputs,
crashes at every step of the commit, unsafe checkpoints and secrets that must never leak."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from brainray import publish, storage
from brainray import score as score_job
from brainray.checkpoint import CHECKPOINT_FORMAT
from brainray.cli import run
from brainray.config import DEFAULT_CLASSES, StorageOptions
from brainray.publish import output_schema
from tests.conftest import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    encode,
    own_lines,
    synthetic_scan,
    upload_tree,
    write_tree,
)
from tests.corpus import write_checkpoint
from tests.faultproxy import Fault, FaultProxy

FAST_FAIL_S = 20  # a job that cannot reach its storage must say so within this


def _images(n: int, offset: int = 0) -> dict[str, bytes]:
    return {f"scan_{offset + i:03d}.png": encode(synthetic_scan(i % 4, 700 + offset + i))
            for i in range(n)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


def _score(model, inputs, output, *extra) -> int:
    flags = [f for uri in inputs for f in ("--input", str(uri))]
    return run(["score", "--model", str(model), *flags, "--output", str(output), "--no-gpu",
                "--batch-size", "8", "--files-per-task", "4", *extra])


def _one_line_error(capfd) -> str:
    """The job's one-line reason: the last line on stderr, and the only one brainray wrote
    (Ray's C++ warnings and forwarded actor lines may surround it on the process's stderr)."""
    err = own_lines(capfd.readouterr().err)
    ours = [line for line in err if line.startswith("brainray score: ")]
    assert len(ours) == 1 and err[-1] == ours[0], err
    return ours[0]


@pytest.fixture
def ray_data_jobs(monkeypatch) -> list:
    """Records every Ray Data pipeline a scoring job starts (none may start on a refusal)."""
    started: list = []
    real = score_job.ray.data.from_items

    def recording(items, *args, **kwargs):
        started.append(len(items))
        return real(items, *args, **kwargs)

    monkeypatch.setattr(score_job.ray.data, "from_items", recording)
    return started


def _bucket_objects(client, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _assert_no_secret(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert FAKE_SECRET.encode() not in data and FAKE_KEY_ID.encode() not in data


def _s3_scores(output: str, options: StorageOptions) -> pd.DataFrame:
    tables = []
    for uri in publish.published_files(output, options):
        fs, path = storage.resolve(uri, options)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables).to_pandas()


# --- storage-level retries (no Ray) ---------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("fault", [
    Fault("503", every=2, limit=4), Fault("500", every=2, limit=4),
    Fault("reset", every=2, limit=4), Fault("close", every=2, limit=4),
    # the reply is lost after the server acted: only for reads, the first GET fails twice
    Fault("reset-after", first=2, method="GET"),
], ids=lambda fault: fault.kind)
def test_storage_reads_and_writes_are_retried_through_transient_faults(s3_endpoint, s3_bucket,
                                                                       fault):
    # Given a proxy that breaks requests (reads and writes) in this way
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="in/blob.bin", Body=b"payload" * 1000)
    with FaultProxy(s3_endpoint, [fault]) as proxy:
        options = StorageOptions(s3_endpoint=proxy.url, s3_region="us-east-1")
        # When brainray.storage reads, writes and checks objects through it
        data = storage.read_bytes(f"s3://{bucket}/in/blob.bin", options)
        storage.write_json(f"s3://{bucket}/out/x.json", {"v": 1}, options)
        assert storage.exists(f"s3://{bucket}/out/x.json", options)
        again = storage.read_bytes(f"s3://{bucket}/in/blob.bin", options)
    # Then every call succeeded (the SDK retried), and the faults really were injected
    print(f"faults injected: {dict(proxy.injected)} in {proxy.requests} requests")
    assert data == again == b"payload" * 1000
    assert json.loads(client.get_object(Bucket=bucket, Key="out/x.json")["Body"].read()) == {
        "v": 1}
    assert proxy.injected[fault.kind] >= 2


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["503", "reset"])
def test_a_persistent_storage_fault_fails_fast_naming_the_uri(s3_endpoint, s3_bucket, kind):
    # Given a store that keeps failing (throttling or resetting) every request
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="in/blob.bin", Body=b"x")
    with FaultProxy(s3_endpoint, [Fault(kind, first=10**6)]) as proxy:
        options = StorageOptions(s3_endpoint=proxy.url, s3_region="us-east-1")
        # When a read is attempted
        with pytest.raises(storage.TransientStorageError) as info:
            storage.read_bytes(f"s3://{bucket}/in/blob.bin", options)
    # Then it was retried a bounded number of times, then failed naming the object
    assert f"s3://{bucket}/in/blob.bin" in str(info.value)
    assert 2 <= proxy.requests <= 4


def test_a_dead_endpoint_fails_storage_calls_fast():
    # Given an endpoint where nothing listens / When an output is probed
    options = StorageOptions(s3_endpoint=f"http://127.0.0.1:{_free_port()}", s3_region="us-east-1")
    started = time.perf_counter()
    with pytest.raises(storage.StorageError) as info:
        storage.ensure_writable("s3://some-bucket/out", options)
    # Then it fails in seconds (it took ~90 s with 10 attempts), naming the location
    assert time.perf_counter() - started < FAST_FAIL_S
    assert "s3://some-bucket/out" in str(info.value)


def test_an_endpoint_with_credentials_in_it_is_refused_without_echoing_them():
    options = StorageOptions(s3_endpoint=f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="must not contain credentials") as info:
        storage.resolve("s3://bucket/key", options)
    _assert_no_secret(str(info.value))


# --- jobs through faults ----------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_scoring_through_injected_faults_gives_exactly_one_row_per_image(
        ray_cluster, model_path, s3_endpoint, s3_bucket, capfd):
    # Given 10 images and a zip of 2 under an S3 prefix, reached through a proxy that throttles,
    # errors and resets requests from the driver and the Ray workers alike
    client, bucket = s3_bucket
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in _images(2, offset=50).items():
            archive.writestr(f"inner/{name}", data)
    input_uri = upload_tree(client, bucket, "in", {**_images(10), "batch.zip": buffer.getvalue()})
    output = f"s3://{bucket}/scores"
    faults = [Fault("503", first=2),  # the job's first request is throttled twice in a row
              Fault("503", every=6, limit=4), Fault("reset", every=7, limit=4),
              Fault("500", every=10, limit=2), Fault("reset-after", every=8, limit=3,
                                                     method="GET")]
    with FaultProxy(s3_endpoint, faults) as proxy:
        # When the scoring job runs with the proxy as its S3 endpoint
        code = _score(model_path, [input_uri], output, "--s3-endpoint", proxy.url,
                      "--s3-region", "us-east-1")
    # Then it commits, with exactly one ok row per image despite every kind of fault
    out, err = capfd.readouterr()
    assert code == 0, err
    print(f"faults injected: {dict(proxy.injected)} in {proxy.requests} requests")
    assert proxy.injected["503"] >= 3 and all(
        proxy.injected[k] >= 1 for k in ("500", "reset", "reset-after")), proxy.injected
    options = StorageOptions(s3_endpoint=s3_endpoint, s3_region="us-east-1")
    scores = _s3_scores(output, options)
    keys = list(zip(scores.uri, scores.member.fillna(""), strict=True))
    assert len(scores) == 12 and len(set(keys)) == 12
    assert set(scores.status) == {"ok"}
    # And no credential appears in the log or in anything the job wrote
    _assert_no_secret(out, err, *_bucket_objects(client, bucket).values())


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_an_input_unreadable_past_the_retries_fails_the_job_and_the_rerun_scores_it(
        ray_cluster, model_path, s3_endpoint, s3_bucket, capfd):
    # Given 6 images, one of which the store keeps refusing with 503 (past every retry)
    client, bucket = s3_bucket
    input_uri = upload_tree(client, bucket, "in", _images(6))
    output = f"s3://{bucket}/scores"
    with FaultProxy(s3_endpoint, [Fault("503", first=10**6,
                                        path_contains="in/scan_003.png")]) as proxy:
        flags = ["--s3-endpoint", proxy.url, "--s3-region", "us-east-1"]
        # When the job runs
        failed = _score(model_path, [input_uri], output, *flags)
        reason = _one_line_error(capfd)
        # Then it fails (a storage outage is not a bad file), naming the object, commits nothing
        assert failed == 1 and "scan_003.png" in reason
        options = StorageOptions(s3_endpoint=s3_endpoint, s3_region="us-east-1")
        assert publish.published_files(output, options) == []
        # And when the store recovers and the job runs again, every image is scored once, ok
        proxy.set_faults([])
        assert _score(model_path, [input_uri], output, *flags) == 0
    scores = _s3_scores(output, options)
    assert len(scores) == 6 and scores.uri.is_unique and set(scores.status) == {"ok"}


@pytest.mark.ray
@pytest.mark.parametrize(("uri", "reason"), [
    ("gs://bucket/scans", "unsupported URI scheme"),
    ("https://host/scans/a.png", "unsupported URI scheme"),
    ("s3:///no-bucket/scans", "not a valid S3 URI"),
    ("s3://user:pass@bucket/scans", "must not contain credentials"),
])
def test_an_invalid_input_uri_is_refused_before_any_work(ray_cluster, model_path, tmp_path,
                                                         capfd, ray_data_jobs, uri, reason):
    code = _score(model_path, [uri], tmp_path / "out")
    message = _one_line_error(capfd)
    assert code == 1 and reason in message and "pass" not in message
    assert ray_data_jobs == [] and not (tmp_path / "out" / "_staging").exists()


@pytest.mark.ray
@pytest.mark.s3
def test_a_dead_endpoint_fails_the_job_fast_with_one_line(ray_cluster, model_path, tmp_path,
                                                          capfd, ray_data_jobs):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    started = time.perf_counter()
    code = _score(model_path, ["s3://archive/in"], "s3://results/scores", "--s3-endpoint",
                  endpoint)
    elapsed = time.perf_counter() - started
    reason = _one_line_error(capfd)
    assert code == 1 and elapsed < FAST_FAIL_S, elapsed
    assert "s3://results/scores" in reason and ray_data_jobs == []


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.parametrize("which", ["output", "input"])
def test_a_missing_bucket_fails_the_job_naming_the_uri(ray_cluster, model_path, s3_bucket,
                                                       s3_options, tmp_path, capfd, which,
                                                       ray_data_jobs):
    # Given a bucket name that does not exist, as the output or as the input
    _, bucket = s3_bucket
    missing = f"s3://brainray-missing-{uuid.uuid4().hex[:8]}/data"
    inputs = [missing] if which == "input" else [f"s3://{bucket}/in"]
    output = missing if which == "output" else tmp_path / "out"
    if which == "output":
        storage.write_bytes(f"s3://{bucket}/in/a.png", encode(synthetic_scan(0, 1)), s3_options)
    # When scoring / Then one line naming the URI, exit 1, and no scoring work started
    code = _score(model_path, inputs, output, "--s3-endpoint", s3_options.s3_endpoint)
    reason = _one_line_error(capfd)
    assert code == 1 and missing in reason
    assert ray_data_jobs == []
    if which == "input":
        assert not (tmp_path / "out" / "_staging").exists()


@pytest.mark.ray
@pytest.mark.s3
def test_access_denied_fails_fast_without_retrying(ray_cluster, model_path, s3_endpoint,
                                                   s3_bucket, capfd, ray_data_jobs):
    # Given a store that refuses every request with 403 AccessDenied (a bucket policy)
    _, bucket = s3_bucket
    output = f"s3://{bucket}/scores"
    with FaultProxy(s3_endpoint, [Fault("403", first=10**6)]) as proxy:
        code = _score(model_path, [f"s3://{bucket}/in"], output, "--s3-endpoint", proxy.url)
    # Then the job fails at once (403 is not retried), naming the output and the reason
    reason = _one_line_error(capfd)
    assert code == 1 and output in reason and "ACCESS_DENIED" in reason
    assert proxy.requests <= 2
    assert ray_data_jobs == []


@pytest.mark.ray
def test_an_unwritable_local_output_fails_before_any_work(ray_cluster, model_path, tmp_path,
                                                          capfd, ray_data_jobs):
    # Given an output under a regular file (unwritable even for root)
    inputs = write_tree(tmp_path / "in", _images(2))
    (tmp_path / "file.txt").write_text("not a folder")
    output = tmp_path / "file.txt" / "out"
    # When scoring into it
    code = _score(model_path, [inputs], output)
    # Then one line naming the output, exit 1, no Ray Data job, nothing created anywhere
    reason = _one_line_error(capfd)
    assert code == 1 and str(output) in reason
    assert ray_data_jobs == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "in"]
    assert (tmp_path / "file.txt").read_text() == "not a folder"


# --- crashes during the commit ----------------------------------------------------------------

# Commit steps (brainray.publish.commit) to SIGKILL a whole scoring job just before: the commit
# point, and the first rename into the published names just after it. tests/test_publish.py kills
# the commit itself before every step, locally and on S3; these go through the whole job.
KILL_STEPS = ("manifest", "publish 0")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("step", KILL_STEPS)
def test_a_scoring_job_killed_in_its_commit_is_finished_by_the_next(ray_cluster, model_path,
                                                                   tmp_path, capfd, step):
    import ray

    # Given a scoring job SIGKILLed at this step of its commit (a subprocess on this cluster)
    inputs = write_tree(tmp_path / "in", _images(7))
    output = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           publish.KILL_BEFORE_ENV: step}
    killed = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--model", str(model_path), "--input", str(inputs),
         "--output", str(output), "--no-gpu", "--batch-size", "8", "--rows-per-file", "3"],
        env=env, cwd=Path(__file__).parents[1], capture_output=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    capfd.readouterr()

    # When the next run starts (the dead job's lease is free: its process is gone)
    assert _score(model_path, [inputs], output) == 0

    # Then the interrupted run is in the output once, and nothing was scored twice or lost
    out = capfd.readouterr().out
    manifest = json.loads((output / publish.MANIFEST).read_text())
    scores = pq.read_table(output / "scores").to_pandas()
    assert len(scores) == 7 and scores.uri.is_unique
    assert sorted(p.name for p in (output / "scores").iterdir()) == sorted(
        f for run in manifest["runs"] for f in run["files"])
    assert not any((output / "_staging").iterdir())
    if step in ("copy 0", "manifest"):  # before the commit point: the next run commits it
        assert "committed interrupted run" in out and "0 file(s) to score" in out
    else:  # after it: the next run finishes it
        assert "finished committed run" in out and "0 file(s) to score" in out


# --- trust: checkpoints -----------------------------------------------------------------------


class _Exploit:
    """Pickles to a call of exec(): what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.ray
def test_a_checkpoint_carrying_code_is_refused_and_never_run(ray_cluster, tmp_path, capfd,
                                                             ray_data_jobs):
    # Given a checkpoint that runs code when unpickled
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": "paper_cnn", "model_id": "x",
                "classes": list(DEFAULT_CLASSES), "preprocess": {"image_size": 32},
                "state_dict": {}, "payload": _Exploit(marker)}, evil)
    inputs = write_tree(tmp_path / "in", _images(1))
    # When it is given to the scoring job
    code = _score(evil, [inputs], tmp_path / "out")
    # Then the job refuses it in one line, without running the payload or scoring anything
    reason = _one_line_error(capfd)
    assert code == 1 and "cannot be loaded safely" in reason and str(evil) in reason
    assert not marker.exists() and ray_data_jobs == []
    # (and the payload is live: an unsafe load would have run it)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.ray
def test_a_model_with_other_classes_is_refused_for_an_existing_output(ray_cluster, tmp_path,
                                                                      capfd, ray_data_jobs):
    # Given an output that already holds committed scores of a 4-class model
    output = tmp_path / "out"
    (output / "scores").mkdir(parents=True)
    pq.write_table(output_schema(list(DEFAULT_CLASSES)).empty_table(),
                   output / "scores" / "part-old-0.parquet")
    (output / publish.MANIFEST).write_text(json.dumps({
        "format": publish.MANIFEST_FORMAT, "schema_version": publish.SCHEMA_VERSION,
        "classes": list(DEFAULT_CLASSES),
        "runs": [{"run_id": "old", "index": None, "files": ["part-old-0.parquet"]}]}))
    manifest = (output / publish.MANIFEST).read_text()
    three = write_checkpoint(tmp_path / "three.pt", classes=("glioma", "meningioma", "notumor"))
    inputs = write_tree(tmp_path / "in", _images(1))
    # When a 3-class model scores into it
    code = _score(three, [inputs], output)
    # Then the job refuses before any work, naming both class lists; the output is unchanged
    reason = _one_line_error(capfd)
    assert code == 1 and "holds scores for classes" in reason and "notumor" in reason
    assert ray_data_jobs == [] and (output / publish.MANIFEST).read_text() == manifest


# --- trust: secrets ---------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.parametrize("where", ["input", "output", "model", "endpoint"])
def test_a_failing_job_never_prints_a_signature_or_credential(ray_cluster, model_path, s3_bucket,
                                                              s3_options, tmp_path, capfd, where):
    # Given a signed URL (or an endpoint with credentials) in one of the job's arguments
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="m/model.pt", Body=model_path.read_bytes())
    signed = f"?X-Amz-Signature={FAKE_SECRET}&X-Amz-Credential={FAKE_KEY_ID}"
    model = f"s3://{bucket}/m/model.pt" + (signed if where == "model" else "")
    inputs = [f"s3://{bucket}/in" + (signed if where == "input" else "")]
    output = f"s3://{bucket}/out" + (signed if where == "output" else "")
    endpoint = s3_options.s3_endpoint
    if where == "endpoint":
        endpoint = endpoint.replace("http://", f"http://{FAKE_KEY_ID}:{FAKE_SECRET}@")
    # When the job runs (storage refuses such URIs)
    code = _score(model, inputs, output, "--s3-endpoint", endpoint)
    # Then it fails with one line, and neither the secret nor the key id is printed anywhere
    out, err = capfd.readouterr()
    assert code == 1 and own_lines(err)[-1].startswith("brainray score: error: "), err
    _assert_no_secret(out, err, *_bucket_objects(client, bucket).values())
    _assert_no_secret(*(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()))
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET  # it was there to leak


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_file_refused_now_is_not_a_row_and_the_next_run_scores_it(
        ray_cluster, model_path, s3_endpoint, s3_bucket, capfd):
    # Given 5 images, one of which the store refuses (403) for this run only
    client, bucket = s3_bucket
    input_uri = upload_tree(client, bucket, "in", _images(5))
    output = f"s3://{bucket}/scores"
    options = StorageOptions(s3_endpoint=s3_endpoint, s3_region="us-east-1")
    with FaultProxy(s3_endpoint, [Fault("403", first=10**6, method="GET",
                                        path_contains="in/scan_002.png")]) as proxy:
        flags = ["--s3-endpoint", proxy.url, "--s3-region", "us-east-1"]
        # When the run scores: it commits the other 4 and names the one it will retry
        assert _score(model_path, [input_uri], output, *flags) == 0
        out = capfd.readouterr().out
        assert "1 file(s) could not be read now and are not scored" in out
        assert "scan_002.png" in out
        assert sorted(_s3_scores(output, options).uri) == [
            f"{input_uri}/scan_00{i}.png" for i in (0, 1, 3, 4)]
        # Then once the store serves it again, the next incremental run scores just that one
        proxy.set_faults([])
        assert _score(model_path, [input_uri], output, *flags) == 0
    assert "1 file(s) to score" in capfd.readouterr().out
    scores = _s3_scores(output, options)
    assert len(scores) == 5 and scores.uri.is_unique and set(scores.status) == {"ok"}
