"""The documented deployment, for real, on several nodes: a Ray head and two worker nodes started
with the `ray` CLI on this machine (each its own raylet), the training and scoring jobs
submitted to the head's job server with the Job Submission SDK, S3 in and out (moto).

The head has no CPUs, so every training worker, task and actor runs on a worker node while the
jobs' drivers stay on the head; killing a worker node is a node failure the jobs must survive.
One cluster serves the module (starting it takes most of a minute); each test puts back the
nodes it killed.
"""

from __future__ import annotations

import io
import json
import shlex
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from brainray.checkpoint import deserialize
from tests.conftest import FAKE_SECRET, tiny_dataset_files, upload_tree
from tests.corpus import write_checkpoint
from tests.raycluster import FAKE_AWS, REPO_ROOT, ray_nodes

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.s3]

PROBE_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420
PER_CLASS = 8
WORKER_NODES = ("node_a", "node_b")
EPOCHS = 5  # the kill, soon after the first checkpoint, lands with 3+ epochs (5-9 s each) to go
SPREAD = ["--num-workers", "2", "--placement-strategy", "STRICT_SPREAD", "--cpus-per-worker",
          "0.5", "--torch-threads", "1", "--no-gpu"]


@pytest.fixture(scope="module")
def nodes():
    with ray_nodes() as cluster:
        cluster.add_nodes(*WORKER_NODES)
        yield cluster


@pytest.fixture
def cluster(nodes):
    """The module's cluster with both worker nodes alive, whatever the last test killed."""
    nodes.add_nodes(*(name for name in WORKER_NODES if name not in nodes.nodes))
    yield nodes
    for name in [n for n in nodes.nodes if n not in ("head", *WORKER_NODES)]:
        nodes.kill_node(name)  # replacement nodes a test added


def _submit(cluster, entrypoint: list[str], env: dict | None = None) -> str:
    from ray.job_submission import JobSubmissionClient

    runtime_env = {"working_dir": str(REPO_ROOT),
                   # a failing job prints its traceback, not only its one-line reason
                   "env_vars": {**FAKE_AWS, "BRAINRAY_DEBUG": "1", **(env or {})}}
    return JobSubmissionClient(cluster.dashboard_url).submit_job(
        entrypoint=shlex.join(entrypoint), runtime_env=runtime_env)


def _wait(cluster, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    """(final status, logs) of a job; stopped when it runs past the timeout."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    return str(status), client.get_job_logs(job_id)


def _run(cluster, entrypoint: list[str], **kwargs) -> str:
    status, logs = _wait(cluster, _submit(cluster, entrypoint, **kwargs))
    assert status == "SUCCEEDED", (f"{shlex.join(entrypoint)} ended {status}\n"
                                   f"--- last job logs ---\n{logs[-3000:]}")
    return logs


def _s3_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _keys(client, bucket: str, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))


def _scores(client, bucket: str, prefix: str) -> pd.DataFrame:
    published = _keys(client, bucket, f"{prefix}/scores/")
    return pd.concat([pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)[
        "Body"].read())).to_pandas() for k in published], ignore_index=True)


def _s3(endpoint: str) -> list[str]:
    return ["--s3-endpoint", endpoint, "--s3-region", "us-east-1"]


def test_a_local_path_is_refused_on_the_multi_node_cluster(cluster, s3_bucket, s3_endpoint):
    # Given training data on S3 but a local run directory
    s3, bucket = s3_bucket
    data_uri = upload_tree(s3, bucket, "d", tiny_dataset_files(per_class=2))
    # When submitted, Then it fails before any work, naming the flag and what to use
    status, logs = _wait(cluster, _submit(cluster, [
        "python", "-m", "jobs.train", "--data", data_uri, "--run-dir", "/tmp/local-run",
        *_s3(s3_endpoint)]))
    assert status == "FAILED"
    assert "cluster: 3 node(s) alive" in logs  # the real node count, from Ray
    assert logs.strip().splitlines()[-1] == (
        "brainray train: error: --run-dir '/tmp/local-run' is a local path, but this cluster "
        "can run the job's work on other nodes (3 alive), which cannot see this machine's "
        "files: use s3://")


def _registered_checkpoints(s3, bucket: str, prefix: str) -> int:
    """Checkpoints Ray Train has registered (its files appear in S3 before that)."""
    try:
        snapshot = _s3_json(s3, bucket, f"{prefix}/checkpoint_manager_snapshot.json")
    except Exception:  # not written yet, or being rewritten
        return 0
    return len(snapshot.get("checkpoint_results", []))


def _wait_while_running(cluster, job_id: str, ready, what: str) -> None:
    """Poll `ready()` until it holds; fail with the job's logs if the job ends first, or with
    `what` after JOB_TIMEOUT_S."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)
        time.sleep(0.5)
    pytest.fail(what)


def _wait_for_checkpoint(s3, bucket: str, prefix: str, job_id: str, cluster) -> None:
    _wait_while_running(cluster, job_id, lambda: _registered_checkpoints(s3, bucket, prefix),
                        "no checkpoint was registered")


def _node_of_a_training_worker(cluster) -> str:
    alive = {node_id: name for name, node_id in cluster.alive_node_resources().items()}
    for node_id in cluster.actor_nodes("RayTrainWorker", state="ALIVE"):
        if node_id in alive:
            return alive[node_id]
    pytest.fail("no alive training worker found")


def _wait_for_workers(cluster, job_id: str) -> None:
    _wait_while_running(
        cluster, job_id, lambda: len(cluster.actor_nodes("RayTrainWorker", state="ALIVE")) >= 2,
        "the training workers did not start")


def _train_until_killed(cluster, s3, bucket, endpoint, name: str, extra: list[str],
                        after_checkpoint: bool = True):
    """Submit a two-node training run; kill the node of one of its workers once the run has a
    checkpoint (or, with after_checkpoint=False, as soon as both workers are up)."""
    data_uri = upload_tree(s3, bucket, "d", tiny_dataset_files(per_class=6))
    job = _submit(cluster, ["python", "-m", "jobs.train", "--data", data_uri, "--run-dir",
                            f"s3://{bucket}/runs/{name}", "--epochs", str(EPOCHS),
                            "--image-size", "64",
                            "--batch-size", "8", "--patience", str(EPOCHS), *SPREAD, *extra,
                            *_s3(endpoint)])
    split = None
    if after_checkpoint:
        _wait_for_checkpoint(s3, bucket, f"runs/{name}", job, cluster)
        split = s3.get_object(Bucket=bucket, Key=f"runs/{name}/split.parquet")["Body"].read()
    else:
        _wait_for_workers(cluster, job)
    # Ray's state API shows the two workers on two different worker nodes
    workers = cluster.actor_nodes("RayTrainWorker", state="ALIVE")
    assert len(workers) == 2 and len(set(workers)) == 2, workers
    assert set(workers) <= set(cluster.alive_node_resources().values())
    victim = _node_of_a_training_worker(cluster)
    cluster.kill_node(victim)
    return job, split, time.monotonic()


def test_training_survives_losing_a_node_and_resumes_from_the_checkpoint(
        cluster, s3_bucket, s3_endpoint):
    # Given a 5-epoch run whose two workers sit on the two worker nodes
    s3, bucket = s3_bucket
    # When, after its first checkpoint, the node of one worker is killed and a new node joins
    job, split, killed_at = _train_until_killed(cluster, s3, bucket, s3_endpoint, "lost",
                                                ["--max-failures", "2"])
    cluster.add_node("node_c")
    status, logs = _wait(cluster, job)
    # Then the run resumes from its latest S3 checkpoint and finishes every epoch once, with the
    # same split
    assert status == "SUCCEEDED", logs[-3000:]
    metrics = _s3_json(s3, bucket, "runs/lost/metrics.json")
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert len(metrics["resumed_at_epochs"]) >= 1
    assert s3.get_object(Bucket=bucket, Key="runs/lost/split.parquet")["Body"].read() == split
    # and the run in the bucket is complete: a loadable model from the two-worker run
    checkpoint = deserialize(s3.get_object(Bucket=bucket, Key="runs/lost/model.pt")["Body"].read())
    assert metrics["model_id"] == checkpoint["model_id"] and metrics["config"]["num_workers"] == 2
    assert f"run written to s3://{bucket}/runs/lost" in logs and FAKE_SECRET not in logs
    resumed = metrics["history"][metrics["resumed_at_epochs"][0] - 1]["epoch_seconds"]
    print(f"node loss: job finished {time.monotonic() - killed_at:.0f} s after the kill; the "
          f"first epoch after the restart took {resumed:.1f} s")


def test_training_without_capacity_left_fails_with_a_reason_not_a_hang(
        cluster, s3_bucket, s3_endpoint):
    # Given a run that needs two nodes, and a worker group allowed to wait 15 s for resources
    s3, bucket = s3_bucket
    job, _, killed_at = _train_until_killed(cluster, s3, bucket, s3_endpoint, "stuck",
                                            ["--max-failures", "1", "--resource-wait-s", "15"],
                                            after_checkpoint=False)
    # When, once both workers run, one of the two nodes is lost and nothing replaces it
    status, logs = _wait(cluster, job, timeout_s=300)
    # Then the job fails within the bound, with one line that says why
    assert status == "FAILED", logs[-3000:]
    reason = logs.strip().splitlines()[-1]
    assert reason.startswith("brainray train: error: the training workers could not get their "
                             "resources"), reason
    print(f"no capacity: the job failed {time.monotonic() - killed_at:.0f} s after the kill")


def test_scoring_survives_losing_a_node_with_every_image_exactly_once(
        cluster, s3_bucket, s3_endpoint, tmp_path):
    # Given a model and 160 images to score with two actors, one per worker node
    s3, bucket = s3_bucket
    model = tiny_model_on_s3(s3, bucket, tmp_path)
    images = {f"in/{i:03d}_{name.split('/')[-1]}": data for i, (name, data) in enumerate(
        list(tiny_dataset_files(per_class=40).items()))}
    for key, data in images.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    score = ["python", "-m", "jobs.score", "--model", model, "--input", f"s3://{bucket}/in",
             "--output", f"s3://{bucket}/out", "--concurrency", "2", "--files-per-task", "4",
             "--batch-size", "8", "--no-gpu", *_s3(s3_endpoint)]
    # When a node hosting a scoring actor is killed mid-run, and a new node joins (as an
    # autoscaler replaces a lost one; without it the actors' CPUs leave the reads none, and
    # Ray Data gives up after 120 s without progress)
    job = _submit(cluster, score)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not cluster.actor_nodes("Scorer", state="ALIVE"):
        assert time.monotonic() < deadline, "no scoring actor started"
        time.sleep(0.5)
    alive = {node_id: name for name, node_id in cluster.alive_node_resources().items()}
    cluster.kill_node(alive[cluster.actor_nodes("Scorer", state="ALIVE")[0]])
    cluster.add_node("node_c")
    first, logs = _wait(cluster, job)
    # Then the run completes, or fails cleanly and the next run completes
    assert first in ("SUCCEEDED", "FAILED"), logs[-3000:]
    if first == "FAILED":
        _run(cluster, score)
    # and every image is in the published output exactly once
    rows = _scores(s3, bucket, "out")
    keys = rows.groupby(["content_sha256", "uri"], dropna=False).size()
    assert len(rows) == len(images) and (keys == 1).all()
    print(f"scoring node loss: the first run ended {first}")


def tiny_model_on_s3(s3, bucket: str, tmp_dir) -> str:
    path = write_checkpoint(tmp_dir / "model.pt")
    s3.put_object(Bucket=bucket, Key="model/model.pt", Body=path.read_bytes())
    return f"s3://{bucket}/model/model.pt"
