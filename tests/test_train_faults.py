"""Training survives a worker process killed mid-run (Ray Train FailureConfig + checkpoints)."""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import pytest

from brainray.cli import run
from tests.conftest import tiny_dataset_files, write_tree

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
    # Given a 4-epoch run and a watcher that kills a training worker after epoch 1's checkpoint
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
                    "--image-size", "32", "--batch-size", "8", "--no-gpu", "--num-workers", "2",
                    "--cpus-per-worker", "1", "--torch-threads", "1", "--max-failures", "2"])
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
