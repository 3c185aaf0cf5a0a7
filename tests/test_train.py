"""The training job end to end on the shared local Ray cluster: S3 in and out, DDP, resume,
bad files, fine-tuning, EMA."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainray import storage
from brainray.checkpoint import deserialize
from brainray.cli import run
from brainray.train import _distinct_images
from tests.conftest import FAKE_SECRET, FAST, own_lines, tiny_dataset_files, upload_tree, write_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BAD_FILES = {
    "glioma/zero_bytes.png": b"",
    "meningioma/truncated.jpg": None,  # filled in below from a real JPEG
    "notumor/not_an_image.jpg": b"this is a text file, not a JPEG\n",
}


def _bad_files() -> dict[str, bytes]:
    good_jpeg = next(v for k, v in tiny_dataset_files(per_class=1).items() if k.endswith(".jpg"))
    return {**BAD_FILES, "meningioma/truncated.jpg": good_jpeg[: len(good_jpeg) // 2]}


def _read_json(uri, options=None):
    return json.loads(storage.read_bytes(uri, options))


@pytest.mark.s3
def test_train_on_s3_with_two_workers_then_evaluate(ray_cluster, s3_bucket, s3_options, capfd):
    # Given a tiny labeled dataset with three unreadable files, in a bucket on the moto server
    client, bucket = s3_bucket
    files = {**tiny_dataset_files(per_class=12), **_bad_files()}
    data_uri = upload_tree(client, bucket, "datasets/tiny", files)
    run_uri = f"s3://{bucket}/runs/exp1"
    s3_flags = ["--s3-endpoint", s3_options.s3_endpoint, "--s3-region", "us-east-1"]

    # When training 2 epochs with 2 DDP workers, reading from and writing to S3
    code = run(["train", "--data", data_uri, "--run-dir", run_uri, "--epochs", "2",
                "--num-workers", "2", *FAST, *s3_flags])

    # Then the run succeeds and leaves a complete, self-describing run directory in the bucket
    assert code == 0
    metrics = _read_json(f"{run_uri}/metrics.json", s3_options)
    for key in ("accuracy", "loss", "macro_f1", "per_class", "confusion_matrix", "classes",
                "roc_auc", "ece", "n_images", "accuracy_ci95", "history", "split"):
        assert key in metrics, key
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    split = pd.read_parquet(io.BytesIO(storage.read_bytes(f"{run_uri}/split.parquet",
                                                          s3_options)))
    assert len(split) == 48
    assert split.groupby("group")["split"].nunique().max() == 1  # no group spans two splits
    # every validation image is evaluated exactly once although two workers share the work
    assert metrics["history"][0]["val_images"] == (split["split"] == "val").sum()
    assert metrics["n_images"] == (split["split"] == "test").sum()
    # and again with each duplicate group of the test split counted once
    assert metrics["distinct_images"]["n_images"] == split.loc[split["split"] == "test",
                                                               "group"].nunique()
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n_images"]
    # the trivial nearest-neighbour baseline is reported on the same test images
    assert metrics["baseline_1nn"]["n_images"] == metrics["n_images"]
    assert 0.0 <= metrics["baseline_1nn"]["accuracy"] <= 1.0

    skipped = {item["path"].rsplit("/", 2)[-2] + "/" + item["path"].rsplit("/", 1)[-1]: item[
        "error"] for item in metrics["skipped_files"]}
    assert set(skipped) == set(BAD_FILES)
    assert "empty" in skipped["glioma/zero_bytes.png"]
    assert all(item["path"].startswith(f"{data_uri}/") for item in metrics["skipped_files"])

    checkpoint_bytes = storage.read_bytes(f"{run_uri}/model.pt", s3_options)
    raw = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    checkpoint = deserialize(checkpoint_bytes)
    assert raw["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    assert checkpoint["preprocess"]["image_size"] == 32
    assert checkpoint["config"]["num_workers"] == 2
    assert checkpoint["epoch"] == metrics["best_epoch"]
    for name in ("accuracy.png", "loss.png", "confusion_matrix.png"):
        assert storage.read_bytes(f"{run_uri}/{name}", s3_options).startswith(b"\x89PNG")
    assert _read_json(f"{run_uri}/config.json", s3_options)["epochs"] == 2

    # When evaluating the finished run on the same labeled data
    eval_uri = f"s3://{bucket}/eval/exp1"
    code = run(["evaluate", "--model", run_uri, "--data", data_uri, "--output", eval_uri,
                *s3_flags, "--no-gpu"])

    # Then every readable image is scored and the report has the same shape as training's
    assert code == 0
    evaluation = _read_json(f"{eval_uri}/metrics.json", s3_options)
    assert evaluation["n_images"] == 48
    assert evaluation["model_id"] == checkpoint["model_id"]
    assert len(evaluation["skipped_files"]) == 3
    assert storage.read_bytes(f"{eval_uri}/confusion_matrix.png", s3_options).startswith(
        b"\x89PNG")
    predictions = pd.read_parquet(io.BytesIO(storage.read_bytes(
        f"{eval_uri}/predictions.parquet", s3_options)))
    assert len(predictions) == 48
    assert predictions[[f"prob_{c}" for c in raw["classes"]]].sum(axis=1).round(4).eq(1).all()

    # And the fake secret key never shows up in what the jobs printed
    out, err = capfd.readouterr()
    assert FAKE_SECRET not in out + err


def _config_of(*flags: str):
    from brainray.cli import build_parser, train_config

    return train_config(build_parser().parse_args(["train", *flags]))


def test_relaunch_with_another_seed_is_refused(ray_cluster, tmp_path, capsys):
    # Given the config.json that a seed-0 run of exactly these flags wrote into its run dir
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=4))
    run_dir = tmp_path / "run"
    flags = ["--data", str(data), "--run-dir", str(run_dir), *FAST]
    storage.write_text(str(run_dir / "config.json"),
                       storage.redacted_json(_config_of(*flags, "--seed", "0")))

    # When the same command is relaunched with only the seed changed
    code = run(["train", *flags, "--seed", "7"])

    # Then it fails with a one-line reason that names the seed, and nothing else
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds a run with different seed; use a new --run-dir or the same "
                        "settings"), err


def test_relaunch_with_the_same_settings_passes_the_resume_check(tmp_path, capsys):
    from brainray.train import _check_resume

    config = _config_of("--data", "/d", "--run-dir", str(tmp_path / "run"), *FAST)
    storage.write_text(str(tmp_path / "run" / "config.json"), storage.redacted_json(config))
    _check_resume(config)  # raises on any difference
    assert "resuming the run in" in capsys.readouterr().out


def test_missing_data_fails_fast_with_the_uri(ray_cluster, tmp_path, capsys):
    # Given a data path that does not exist
    missing = tmp_path / "nowhere"

    # When training on it
    code = run(["train", "--data", str(missing), "--run-dir", str(tmp_path / "r"), *FAST])

    # Then the job exits non-zero naming the path
    assert code == 1
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and str(missing) in err[0]


def _weights_file(path, name: str = "resnet18", seed: int = 0):
    """A torchvision-layout state dict (1000-class head), as torchvision publishes them."""
    import torchvision

    torch.manual_seed(seed)
    torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)
    return path


def test_fine_tune_a_torchvision_model_then_score_explain_and_export(ray_cluster, tmp_path):
    # Given a resnet18 weights file and a tiny dataset
    weights = _weights_file(tmp_path / "resnet18.pth")
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=6))
    run_dir = tmp_path / "runs" / "ft"

    # When fine-tuning from it for one epoch, with EMA, label smoothing and flip TTA
    assert run(["train", "--data", str(data), "--run-dir", str(run_dir), "--epochs", "1",
                "--model", "resnet18", "--weights", str(weights), "--ema-decay", "0.9",
                "--label-smoothing", "0.1", "--tta", "hflip", *FAST]) == 0

    # Then the checkpoint says where its initial weights came from, and their hash
    import hashlib

    checkpoint = deserialize((run_dir / "model.pt").read_bytes())
    assert checkpoint["initial_weights"] == {
        "source": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert checkpoint["test_time_augmentation"] == "hflip"
    # and the report holds what TTA adds, the leakage measure and the raw weights' validation
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["without_tta"]["accuracy"] is not None
    assert metrics["near_duplicates"]["n_images"] == metrics["n_images"]
    assert "val_accuracy_raw" in metrics["history"][0]
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert str(weights) in card and "Near-duplication left across the split" in card

    # When the model scores, explains and exports, Then each works for it too
    out = tmp_path / "scores"
    assert run(["score", "--model", str(run_dir), "--input", str(data / "glioma"),
                "--output", str(out), "--no-gpu"]) == 0
    rows = pd.read_parquet(out / "scores")
    assert len(rows) == 6 and (rows["status"] == "ok").all()
    assert set(rows["model_id"]) == {checkpoint["model_id"]}
    assert run(["explain", "--model", str(run_dir), "--input", str(data / "notumor"),
                "--output", str(tmp_path / "cam"), "--max-images", "2"]) == 0
    assert len(list((tmp_path / "cam").glob("*.png"))) == 2
    assert run(["export", "--model", str(run_dir), "--output", str(tmp_path / "export"),
                "--no-onnx"]) == 0
    assert (tmp_path / "export" / "model.ts").stat().st_size > 0


def test_weights_that_do_not_fit_are_refused_before_any_data_is_read(ray_cluster, tmp_path,
                                                                      capsys):
    weights = _weights_file(tmp_path / "resnet18.pth")
    code = run(["train", "--data", str(tmp_path / "no-data-here"), "--run-dir",
                str(tmp_path / "r"), "--model", "resnet50", "--weights", str(weights), *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert "does not fit resnet50" in err and "no-data-here" not in err


@dataclass
class Relaunched:
    """A run stopped after its first epoch and relaunched for a second: EMA on, tracked in a
    sqlite MLflow store (one expensive pair of runs that three tests read)."""

    run_dir: Path
    store: str
    first: dict  # metrics.json after the first launch
    first_state: dict  # the train state of epoch 1's checkpoint
    relaunch_out: str  # what the relaunch printed


@contextlib.contextmanager
def _stdout_fd_captured():
    """What the process writes to file descriptor 1 in the block (brainray's console writes to
    a copy of it, which capfd cannot reach from a module-scoped fixture)."""
    sys.stdout.flush()
    saved, printed = os.dup(1), io.StringIO()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield printed
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            printed.write(sink.read().decode(errors="replace"))
            printed.seek(0)


@pytest.fixture(scope="module")
def relaunched(ray_cluster, tmp_path_factory) -> Relaunched:
    root = tmp_path_factory.mktemp("relaunched")
    data = write_tree(root / "data", tiny_dataset_files(per_class=8))
    run_dir, store = root / "runs" / "resumable", f"sqlite:///{root / 'mlflow.db'}"
    flags = ["train", "--data", str(data), "--run-dir", str(run_dir), "--ema-decay", "0.5",
             "--mlflow-tracking-uri", store, "--mlflow-experiment", "brainray-ci", *FAST]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # MLflow's default artifact root is ./mlruns
        assert run([*flags, "--epochs", "1"]) == 0
        first = json.loads((run_dir / "metrics.json").read_text())
        state = torch.load(next(run_dir.glob("checkpoint_*")) / "train_state.pt",
                           weights_only=True)
        with _stdout_fd_captured() as printed:
            assert run([*flags, "--epochs", "2"]) == 0
    return Relaunched(run_dir, store, first, state, printed.read())


def test_relaunch_resumes_from_the_latest_checkpoint(relaunched):
    # Then it continues at epoch 2 instead of starting over, keeping epoch 1's history
    assert "resuming from the checkpoint of epoch 1" in relaunched.relaunch_out
    second = json.loads((relaunched.run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == relaunched.first["history"][0]
    assert second["resumed_at_epochs"] == [2] and relaunched.first["resumed_at_epochs"] == []


def test_an_ema_run_resumes_from_its_raw_weights(relaunched):
    # The train state keeps the raw weights and the average's count, not only the average
    state = relaunched.first_state
    assert "raw_state_dict" in state and int(state["ema_n_averaged"]) >= 1


def test_each_epoch_reaches_mlflow_and_tensorboard_and_a_relaunch_continues(relaunched):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # One MLflow run holds both epochs and the final test accuracy of metrics.json
    metrics = json.loads((relaunched.run_dir / "metrics.json").read_text())
    client = mlflow.MlflowClient(relaunched.store)
    experiment = client.get_experiment_by_name("brainray-ci")
    (tracked,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(tracked.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([h["val_loss"]
                                                        for h in metrics["history"]])
    assert client.get_run(tracked.info.run_id).data.metrics["test_accuracy"] == pytest.approx(
        metrics["accuracy"])
    # and TensorBoard's reader finds the same epochs in the run directory
    events = EventAccumulator(str(relaunched.run_dir / "tensorboard"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("loss/val")}) == [1, 2]


def test_distinct_images_count_each_test_group_once_and_skip_an_ungrouped_held_out_set():
    # given three test predictions, two of them copies of one image (group 4), and one wrong
    predictions = pd.DataFrame({"path": ["/t/b", "/t/a", "/t/c"], "label": [0, 0, 1],
                                "probs": [np.array([0.9, 0.1]), np.array([0.8, 0.2]),
                                          np.array([0.7, 0.3])]})
    grouped = pd.DataFrame({"path": ["/t/a", "/t/b", "/t/c"], "group": [4, 4, 9]})
    # when measured / then the copies count once; a held-out set (no groups) gets no figure
    distinct = _distinct_images(predictions, grouped, ["glioma", "meningioma"])
    assert (distinct["n_images"], distinct["accuracy"]) == (2, 0.5)
    assert _distinct_images(predictions, grouped.drop(columns="group"), ["a", "b"]) is None
