"""Training survives a worker process killed mid-run (Ray Train FailureConfig + checkpoints)."""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import pytest

from brainray.cli import build_parser, run, train_config
from brainray.report import skipped_files
from brainray.train import prepare_splits
from tests.conftest import FAST, own_lines, tiny_dataset_files, upload_tree, write_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _registered_checkpoints(run_dir) -> int:
    """Checkpoints Ray Train has registered (a checkpoint_* folder appears before that)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def _kill_a_train_worker_after_first_checkpoint(run_dir, killed: list, stop: threading.Event):
    """SIGKILL one RayTrainWorker of *this* cluster once epoch 1's checkpoint is registered.

    The session cluster's processes descend from this pytest process (ray.init started them);
    other Ray instances on the machine have processes of the same name, so never match by name
    alone.
    """
    while not stop.is_set():
        if _registered_checkpoints(run_dir):
            for process in psutil.Process().children(recursive=True):
                try:
                    if "ray::RayTrainWorker" in " ".join(process.cmdline()):
                        process.send_signal(signal.SIGKILL)
                        killed.append(process.pid)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.1)


def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(ray_cluster, tmp_path):
    # Given a 4-epoch run and a watcher that kills its training worker after epoch 1's checkpoint
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=8))
    run_dir = tmp_path / "runs" / "faulty"
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_a_train_worker_after_first_checkpoint,
                               args=(run_dir, killed, stop), daemon=True)
    watcher.start()

    # When the run goes on (it may restart up to --max-failures times)
    try:
        code = run(["train", "--data", str(data), "--run-dir", str(run_dir), "--epochs", "4",
                    *FAST, "--max-failures", "2"])
    finally:
        stop.set()
        watcher.join(timeout=5)

    # Then a worker really died, the run resumed from a checkpoint and finished every epoch once
    assert killed, "no training worker was killed"
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["resumed_at_epochs"]) >= 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert (run_dir / "model.pt").exists()


# --- storage faults while reading the training data ------------------------------------------


def _s3_flags(endpoint: str) -> list[str]:
    return ["--s3-endpoint", endpoint, "--s3-region", "us-east-1"]


@pytest.mark.s3
@pytest.mark.parametrize("layout", ["folder", "manifest"])
def test_an_image_unreadable_past_the_retries_fails_training_naming_it(
        ray_cluster, s3_endpoint, s3_bucket, tmp_path, capfd, monkeypatch, layout):
    # Given training data on S3 of which the store keeps refusing one object with 503
    from ray.data import DataContext

    from tests.faultproxy import Fault, FaultProxy

    # Ray Data retries a folder's reads itself (10 attempts, backoff up to 32 s: about three
    # minutes of a test); without its patterns the S3 client's own retries are the ones to outlast
    monkeypatch.setattr(DataContext.get_current(), "retried_io_errors", [])

    client, bucket = s3_bucket
    files = tiny_dataset_files(per_class=4)
    data = upload_tree(client, bucket, "mri", files)
    if layout == "manifest":
        lines = ["path,label", *(f"{p},{p.split('/')[0]}" for p in files)]
        client.put_object(Bucket=bucket, Key="mri/manifest.csv", Body="\n".join(lines).encode())
        data = f"{data}/manifest.csv"
    victim = next(iter(files))
    with FaultProxy(s3_endpoint, [Fault("503", first=10**6, path_contains=victim)]) as proxy:
        # When training reads it
        code = run(["train", "--data", data, "--run-dir", f"s3://{bucket}/runs/{layout}",
                    "--epochs", "1", *FAST, *_s3_flags(proxy.url)])
    # Then the job fails with one line naming the object, and no run report is written
    assert code == 1
    reason = own_lines(capfd.readouterr().err)[-1]
    assert reason.startswith("brainray train: error: ") and victim.split("/")[-1] in reason
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{layout}/metrics.json")
    assert listed.get("KeyCount", 0) == 0


def test_a_file_a_manifest_lists_but_that_does_not_exist_is_skipped_with_the_reason(
        ray_cluster, tmp_path):
    # Given a manifest that lists one file more than the folder holds
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=4))
    lines = ["path,label", *(f"{p.relative_to(data)},{p.parent.name}"
                             for p in sorted(data.rglob("*.*"))), "glioma/gone.png,glioma"]
    (data / "manifest.csv").write_text("\n".join(lines))
    # When training reads and splits it (what metrics.json's skipped_files is made of; the S3
    # test in test_train follows bad files into metrics.json)
    config = train_config(build_parser().parse_args(
        ["train", "--data", str(data / "manifest.csv"), "--run-dir", str(tmp_path / "run")]))
    labeled, _, index = prepare_splits(config)
    # Then the missing file is skipped with the reason, and every other file is split
    skipped = skipped_files(labeled.index)
    assert [(s["path"].rsplit("/", 2)[-2:], s["error"]) for s in skipped] == [
        (["glioma", "gone.png"], "listed in the manifest, but the file does not exist")]
    assert len(index) == 16
