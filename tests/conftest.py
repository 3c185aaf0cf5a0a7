"""Shared fixtures: one local Ray cluster, one moto S3 server on 127.0.0.1, tiny image datasets.

Pure tests use none of these; `pytest -m "not ray and not s3"` runs that layer in seconds.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from brainray.config import DEFAULT_CLASSES, StorageOptions

FAKE_KEY_ID = "AKIAFAKEBRAINRAYTEST"
FAKE_SECRET = "brainray-fake-secret-never-logged-0123456789"
# Training flags that keep a fit to seconds: small images and batches, one thread, no warm-up;
# the pipeline is the same as at full size.
FAST = ["--image-size", "32", "--batch-size", "8", "--no-gpu", "--cpus-per-worker", "1",
        "--torch-threads", "1", "--warmup-epochs", "0"]


# Ray forwards other processes' output to the driver as "(Name pid=N) ..." (coloured on a
# terminal); in tests a leftover actor of an earlier test on the shared cluster can print one at
# any moment, so assertions about brainray's own stderr leave those lines out.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\S+ pid=\d+")


def own_lines(stream_text: str) -> list[str]:
    """The lines of captured output that brainray printed, without Ray's forwarded ones."""
    return [line for line in stream_text.strip().splitlines() if not _RAY_FORWARDED.match(line)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_scan(label: int, index: int, size: int = 48, mode: str = "L") -> Image.Image:
    """A distinct fake 'slice': a class-dependent blob over per-image random texture.

    Random texture makes every image's perceptual hash different, so none are near-duplicates.
    """
    rng = np.random.default_rng(1000 * label + index)
    yy, xx = np.mgrid[:size, :size] / size
    centre = [(0.3, 0.3), (0.7, 0.3), (0.5, 0.5), (0.3, 0.7)][label % 4]
    blob = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / 0.02)
    pixels = np.clip(80 * rng.random((size, size)) + 170 * blob, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")
    return image.convert(mode) if mode != "L" else image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def tiny_dataset_files(per_class: int = 10, size: int = 48) -> dict[str, bytes]:
    """Relative path -> bytes for a class-folder dataset; a mix of PNG/JPEG and gray/RGB."""
    files = {}
    for label, name in enumerate(DEFAULT_CLASSES):
        for i in range(per_class):
            mode, fmt = ("RGB", "JPEG") if i % 3 == 0 else ("L", "PNG")
            ext = "jpg" if fmt == "JPEG" else "png"
            files[f"{name}/img_{i:03d}.{ext}"] = encode(synthetic_scan(label, i, size, mode), fmt)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def pytest_itemcollected(item):
    """The suite runs on two pytest-xdist workers (`-n 2 --dist loadgroup`, pyproject's addopts):
    the tests of the shared local Ray cluster stay together on one worker (one cluster, its
    session fixtures built once), the multi-node module on the other, whose jobs spend much of
    their time waiting on Ray (node start-up, failure detection, restarts); the pure tests fill
    both. (Marked as each test is collected, before any plugin's
    pytest_collection_modifyitems, where pytest-xdist reads the marks.)"""
    if item.get_closest_marker("cluster"):
        item.add_marker(pytest.mark.xdist_group("cluster"))
    elif "ray_cluster" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config):
    # Read by Ray Data when it is first imported, so it is set before any test module loads:
    # a stuck pipeline then fails its test in two minutes instead of hanging CI for thirty.
    os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")


@pytest.fixture(scope="session", autouse=True)
def _aws_test_environment():
    """Fake credentials for moto, set before Ray starts so its workers inherit them too."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                           "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 HTTP endpoint (moto server mode) on a free loopback port."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint) -> StorageOptions:
    return StorageOptions(s3_endpoint=s3_endpoint, s3_region="us-east-1")


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket per test (unique name, so tests never see each other's objects)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def upload_tree(client, bucket: str, prefix: str, files: dict[str, bytes]) -> str:
    for relative, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{relative}", Body=data)
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray per session; 4 logical CPUs, so 2 train workers leave room for Ray Data."""
    import ray

    ray.init(num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    yield
    ray.shutdown()


def brainray_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """`brainray ARGS` in a subprocess on a pipe (as in CI, cron or `ray job logs`), joined to
    the session's cluster as to a user's `ray start` one: a fresh local Ray per command would
    add a start-up on 2 CPUs and nothing brainray's console decides."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, "-c", "from brainray.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


class TrainedRun(NamedTuple):
    data: Path
    run_dir: Path
    console: subprocess.CompletedProcess  # what `brainray train` printed


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tmp_path_factory) -> TrainedRun:
    """One tiny finished training run, shared by the tests that only read a run or its console
    (a fit costs ~30 s of Ray Train start-up alone): 8 images per class, two epochs, target
    accuracy 0.9, run as a user runs it. Tests write their own outputs elsewhere and never
    modify it."""
    root = tmp_path_factory.mktemp("trained")
    data, run_dir = write_tree(root / "data", tiny_dataset_files(per_class=8)), root / "run"
    console = brainray_cli("train", "--data", str(data), "--run-dir", str(run_dir), "--epochs",
                           "2", "--target-accuracy", "0.9", *FAST, cwd=root)
    assert console.returncode == 0, console.stderr[-2000:]
    return TrainedRun(data, run_dir, console)


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_tree(tmp_path / "data", tiny_dataset_files())


@pytest.fixture(params=["local", "s3"])
def local_and_s3_output(request, tmp_path) -> tuple[str, StorageOptions]:
    """(output URI, storage options): a local folder, then a prefix on the moto S3 server (the
    S3 fixtures are only started for the second)."""
    if request.param == "local":
        return str(tmp_path / "out"), StorageOptions()
    bucket = request.getfixturevalue("s3_bucket")[1]
    return f"s3://{bucket}/out", request.getfixturevalue("s3_options")
