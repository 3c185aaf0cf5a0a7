"""The documented deployment, for real: a Ray head started with the `ray` CLI, the training and
scoring jobs submitted to its job server with the Job Submission SDK, S3 in and out (moto).

The head is a separate, private Ray instance: its own temp dir, loopback address and free ports,
so it coexists with the session cluster of `conftest.ray_cluster` and with any other Ray on the
machine. It is stopped by killing exactly the processes it started, never with `ray stop` (which
kills every Ray process on the machine; it has no way to target one cluster).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from brainray.checkpoint import deserialize
from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, tiny_dataset_files, upload_tree

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.s3]

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venv's bin folder, not resolved: resolving would follow `python` to the base interpreter.
VENV_BIN = Path(sys.executable).parent
FAKE_AWS = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
HEAD_START_TIMEOUT_S = 240
PROBE_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 420
SCORE_TIMEOUT_S = 300
PER_CLASS = 8


def _psutil():
    """Ray vendors psutil (ray/thirdparty_files) and puts it on sys.path when imported."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _free_ports(n: int) -> list[int]:
    """n distinct ports, free on every interface, below the kernel's ephemeral range.

    Ray binds on all interfaces, and the other Ray instances on this machine keep starting
    workers on kernel-assigned ephemeral ports (32768+): a port taken from there could be grabbed
    by one of them between this check and our head binding it. Below that range only explicit
    binds compete, and Ray's fixed defaults (6379, 8265, 10001, 52365...) are not in 20000-32000.
    """
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass(frozen=True)
class LiveCluster:
    dashboard_url: str
    temp_dir: str
    head: subprocess.Popen


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _wait_for_job_server(url: str, head: subprocess.Popen, head_log: Path) -> None:
    """Until the dashboard's job API answers; fails early if `ray start` itself died."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"`ray start` exited with {head.returncode}:\n{_tail(head_log)}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                json.loads(response.read())
            JobSubmissionClient(url).list_jobs()
            return
        except Exception as exc:  # not up yet: connection refused, 5xx, version check
            last_error = exc
            time.sleep(2)
    pytest.fail(f"the job server at {url} did not answer within {HEAD_START_TIMEOUT_S} s "
                f"({last_error!r}); `ray start` output:\n{_tail(head_log)}")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> list[str]:
    """Kill everything this head started, and only that; returns what is still running after.

    `ray start --head --block` runs in its own session (start_new_session), so its process group
    holds the GCS, raylet, dashboard, monitor and log monitor. Workers, agents and job drivers
    are NOT in that group: the raylet gives each worker its own process group and the job
    supervisor starts each entrypoint in a new session. They are all descendants of the head
    process while it lives, though, so the whole tree is snapshotted first, then the group gets
    SIGTERM (the head shuts its node down), and whatever in the snapshot outlives a grace period
    gets SIGKILL (psutil checks each process's create time, so a recycled pid is never hit). A
    graceful stop takes ~30 s on a busy 2-core machine; nothing of this throwaway cluster needs
    it (its temp dir is deleted and the object store leaves nothing in /dev/shm), hence 10 s.
    """
    psutil = _psutil()
    try:
        root = psutil.Process(head.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)  # head is a session leader: its pgid is its pid
    _, alive = psutil.wait_procs(tree, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if temp_dir in cmdline:
            leftovers.append(f"{process.info['pid']}: {cmdline[:200]}")
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{process.pid}: {process.name()}")
    return leftovers


@pytest.fixture(scope="module")
def live_cluster():
    """A real single-node Ray cluster started with the venv's `ray start --head`."""
    # A short temp dir: Ray puts unix sockets under it and their paths are limited to ~107 chars.
    temp_dir = tempfile.mkdtemp(prefix="br", dir="/tmp")
    (gcs, dashboard, client_server, node_manager, object_manager, metrics, agent_http,
     agent_grpc, runtime_env_agent) = _free_ports(9)
    # Jobs inherit the head's environment: the venv's bin first on PATH, so the entrypoint's
    # `python` is the venv's (it has brainray's dependencies; the system one does not), and fake
    # AWS credentials for moto. RAY_ADDRESS is dropped: it would point at another cluster.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FAKE_AWS, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # On a busy 2-core machine the dashboard's module subprocesses can take longer than Ray's
    # 30 s (per module) and 60 s (whole dashboard) start-up limits, and `ray start` then fails.
    env.update(RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="120",
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="150")
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        # Ray maps a loopback node IP to the machine's routable one and binds its servers on
        # all interfaces, hence ports free everywhere; the dashboard does stay on loopback.
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client_server),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent),
        "--num-cpus", "4", "--num-gpus", "0", "--object-store-memory", "300000000",
        "--temp-dir", temp_dir, "--disable-usage-stats", "--log-style", "record",
        "--log-color", "false",
    ]
    head_log = Path(temp_dir) / "ray-start.log"
    with open(head_log, "wb") as log:
        head = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(url, head, head_log)
        yield LiveCluster(dashboard_url=url, temp_dir=temp_dir, head=head)
    finally:
        leftovers = _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster outlived it: {leftovers}"


def _run_job(client, entrypoint: list[str], timeout_s: float) -> str:
    """Submit like `ray job submit --working-dir .`, wait for the end; returns the job's logs."""
    from ray.job_submission import JobStatus

    runtime_env = {"working_dir": str(REPO_ROOT), "env_vars": dict(FAKE_AWS)}
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    message = client.get_job_info(job_id).message
    assert status == JobStatus.SUCCEEDED, (
        f"job {job_id} ({shlex.join(entrypoint)}) ended {status} "
        f"(timeout {timeout_s} s): {message}\n--- last job logs ---\n{logs[-3000:]}")
    return logs


def _s3_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_train_then_score_as_jobs_on_a_live_cluster(live_cluster, s3_bucket, s3_endpoint):
    from ray.job_submission import JobSubmissionClient

    # Given a tiny labeled dataset (8 images per class) in a bucket on the moto S3 server
    s3, bucket = s3_bucket
    files = tiny_dataset_files(per_class=PER_CLASS)
    data_uri = upload_tree(s3, bucket, "datasets/tiny", files)
    run_uri, scores_uri = f"s3://{bucket}/runs/live", f"s3://{bucket}/scores"
    s3_flags = ["--s3-endpoint", s3_endpoint, "--s3-region", "us-east-1"]
    jobs = JobSubmissionClient(live_cluster.dashboard_url)
    # and a job's `python` is the venv's, which has brainray's dependencies (it comes from the
    # PATH the head was started with; the machine's default python has neither ray nor torch)
    probe = _run_job(jobs, ["python", "-c", "import sys; print(sys.executable)"], PROBE_TIMEOUT_S)
    assert Path(probe.strip().splitlines()[-1]).parent == VENV_BIN, probe[-1000:]

    # When the training job is submitted to the cluster's job server (1 epoch, 2 DDP workers)
    train_logs = _run_job(jobs, [
        "python", "-m", "jobs.train", "--data", data_uri, "--run-dir", run_uri,
        "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--num-workers", "2",
        "--cpus-per-worker", "1", "--torch-threads", "1", "--no-gpu", *s3_flags],
        TRAIN_TIMEOUT_S)

    # Then the run is written to the bucket: a loadable checkpoint and a one-epoch report
    checkpoint = deserialize(s3.get_object(Bucket=bucket,
                                           Key="runs/live/model.pt")["Body"].read())
    metrics = _s3_json(s3, bucket, "runs/live/metrics.json")
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["model_id"] == checkpoint["model_id"]
    assert metrics["config"]["num_workers"] == 2
    assert checkpoint["preprocess"]["image_size"] == 32
    assert f"run written to s3://{bucket}/runs/live" in train_logs

    # When the scoring job is submitted with the trained run as its model
    score_logs = _run_job(jobs, [
        "python", "-m", "jobs.score", "--model", run_uri, "--input", data_uri,
        "--output", scores_uri, "--no-gpu", *s3_flags], SCORE_TIMEOUT_S)

    # Then exactly one committed run is published: manifest, _SUCCESS, no staging left behind
    manifest = _s3_json(s3, bucket, "scores/_manifest.json")
    assert len(manifest["runs"]) == 1
    run = manifest["runs"][0]
    assert _s3_json(s3, bucket, "scores/_SUCCESS")["run_id"] == run["run_id"]
    published = sorted(o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix="scores/scores/").get("Contents", []))
    assert published == sorted(f"scores/scores/{name}" for name in run["files"])
    staged = [o["Key"] for o in s3.list_objects_v2(
        Bucket=bucket, Prefix="scores/_staging/").get("Contents", [])]
    assert [key for key in staged if not key.endswith("/")] == []  # "dir/" markers are empty

    # And the Parquet rows are one ok row per input image, scored by the trained model
    tables = [pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
              for key in published]
    rows = [row for t in tables for row in t.to_pylist()]
    assert sorted(r["uri"] for r in rows) == sorted(f"{data_uri}/{name}" for name in files)
    assert len(rows) == 4 * PER_CLASS
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["model_id"] for r in rows} == {checkpoint["model_id"]}
    assert {r["run_id"] for r in rows} == {run["run_id"]}
    assert {r["predicted_label"] for r in rows} <= set(checkpoint["classes"])

    # And the fake secret key never appears in what the jobs printed
    assert FAKE_SECRET not in train_logs + score_logs
