"""Tests for brainray.tracking: TensorBoard event files and MLflow runs, read back with the
libraries' own readers (TensorBoard's event accumulator, MLflow's client on a sqlite store)."""

from __future__ import annotations

import json
import os

import mlflow
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from brainray.checkpoint import METRICS_FILE, MODEL_CARD_FILE, MODEL_FILE
from brainray.config import TrainConfig
from brainray.html_report import REPORT_FILE
from brainray.tracking import MLFLOW_RUN_FILE, TENSORBOARD_DIR, RunTracker


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch,
            "train_accuracy": 0.5 + 0.1 * epoch, "val_accuracy": 0.4 + 0.1 * epoch,
            "lr": 1e-3, "images_per_s": 100.0 + epoch}


def _report() -> dict:
    return {"accuracy": 0.93, "macro_f1": 0.92, "loss": 0.2, "ece": 0.03, "roc_auc": 0.99,
            "baseline_1nn": {"accuracy": 0.88}}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A sqlite MLflow store, with artifacts under tmp_path (its default root is ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # for the test's own reads (search_runs)
    return uri


def _config(tmp_path, **fields) -> TrainConfig:
    run_dir = tmp_path / "run"
    for name, data in ((MODEL_FILE, b"weights"), (METRICS_FILE, b"{}"),
                       (MODEL_CARD_FILE, b"# card"), (REPORT_FILE, b"<!DOCTYPE html>")):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)
    return TrainConfig(data="/d", run_dir=str(run_dir), **fields)


def test_tensorboard_events_hold_every_epochs_scalars(tmp_path):
    # Given a run without MLflow
    config = _config(tmp_path)
    # When two epochs are tracked
    with RunTracker(config) as tracker:
        tracker.epoch(_epoch(1))
        tracker.epoch(_epoch(2))
        tracker.finish(_report())
    # Then TensorBoard's own reader finds loss, accuracy, lr and img/s per epoch
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    assert {"loss/train", "loss/val", "accuracy/val", "lr", "images_per_s"} <= set(
        events.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss/val")] == [(1, 1.5),
                                                                                  (2, 0.75)]
    assert not (tmp_path / "run" / MLFLOW_RUN_FILE).exists()


def test_an_mlflow_run_gets_params_epochs_test_metrics_and_files(tmp_path, mlflow_store):
    config = _config(tmp_path, mlflow_tracking_uri=mlflow_store, mlflow_experiment="brainray-t")
    with RunTracker(config) as tracker:
        tracker.epoch(_epoch(1))
        tracker.epoch(_epoch(2))
        tracker.finish(_report())
    client = mlflow.MlflowClient(mlflow_store)
    (run,) = mlflow.search_runs(experiment_names=["brainray-t"], output_format="list")
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "bn_cnn"
    assert run.data.params["preprocess.image_size"] == "128"
    assert run.data.metrics["test_accuracy"] == 0.93
    assert run.data.metrics["baseline_1nn_accuracy"] == 0.88
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.75)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {MODEL_FILE, METRICS_FILE, MODEL_CARD_FILE, REPORT_FILE} <= artifacts


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path, mlflow_store):
    config = _config(tmp_path, mlflow_tracking_uri=mlflow_store)
    with RunTracker(config) as tracker:  # the first launch, stopped after epoch 1
        tracker.epoch(_epoch(1))
    first = json.loads((tmp_path / "run" / MLFLOW_RUN_FILE).read_text())["run_id"]
    with RunTracker(config) as tracker:  # the relaunch
        tracker.epoch(_epoch(2))
        tracker.finish(_report())
    runs = mlflow.search_runs(experiment_names=["brainray"], output_format="list")
    assert [r.info.run_id for r in runs] == [first]
    history = mlflow.MlflowClient(mlflow_store).get_metric_history(first, "val_loss")
    assert [m.step for m in history] == [1, 2]


def test_a_failed_run_is_marked_failed_in_mlflow(tmp_path, mlflow_store):
    config = _config(tmp_path, mlflow_tracking_uri=mlflow_store)
    with pytest.raises(RuntimeError), RunTracker(config) as tracker:
        tracker.epoch(_epoch(1))
        raise RuntimeError("worker died")
    (run,) = mlflow.search_runs(experiment_names=["brainray"], output_format="list")
    assert run.info.status == "FAILED"


def test_the_model_is_registered_with_the_test_metrics_as_tags(tmp_path, mlflow_store):
    config = _config(tmp_path, mlflow_tracking_uri=mlflow_store,
                     mlflow_registered_model="brainray-tumor")
    with RunTracker(config) as tracker:
        tracker.finish(_report())
    client = mlflow.MlflowClient(mlflow_store)
    (version,) = client.search_model_versions("name = 'brainray-tumor'")
    assert version.tags["test_accuracy"] == "0.93"
    assert version.source.endswith(f"/{MODEL_FILE}")


def test_registering_needs_a_tracking_uri():
    with pytest.raises(ValueError, match="--mlflow-register-model needs --mlflow-tracking-uri"):
        TrainConfig(data="d", run_dir="r", mlflow_registered_model="m")


def test_epochs_logged_from_another_thread_land_in_the_same_run(tmp_path, mlflow_store):
    # The driver logs epochs from its event thread, where MLflow's fluent API has no active run
    import threading

    config = _config(tmp_path, mlflow_tracking_uri=mlflow_store)
    with RunTracker(config) as tracker:
        worker = threading.Thread(target=tracker.epoch, args=(_epoch(1),))
        worker.start()
        worker.join()
        tracker.finish(_report())
    runs = mlflow.search_runs(experiment_names=["brainray"], output_format="list")
    assert len(runs) == 1 and "val_loss" in runs[0].data.metrics


@pytest.mark.s3
def test_a_run_on_s3_gets_its_events_there_and_leaves_no_local_copy(tmp_path, s3_bucket,
                                                                     s3_options):
    client, bucket = s3_bucket
    config = TrainConfig(data="/d", run_dir=f"s3://{bucket}/run", storage=s3_options)
    with RunTracker(config) as tracker:
        tracker.epoch(_epoch(1))
        tracker.finish(_report())
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"run/{TENSORBOARD_DIR}/")
    assert [o["Key"].split("/")[-1].startswith("events.out.tfevents") for o in
            listed["Contents"]] == [True]
    assert not os.path.exists(tracker.tb_dir)
