"""End-to-end training on the shared local Ray cluster: S3 in and out, DDP, resume, bad files."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch

from brainray import storage
from brainray.cli import run
from brainray.model import deserialize
from tests.conftest import FAKE_SECRET, tiny_dataset_files, upload_tree, write_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Small images and batches keep each fit to seconds; the pipeline is the same as at 224 px.
FAST = ["--image-size", "32", "--batch-size", "8", "--no-gpu", "--cpus-per-worker", "1",
        "--torch-threads", "1", "--warmup-epochs", "0"]

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


def test_relaunch_resumes_from_the_latest_checkpoint(ray_cluster, tmp_path, capfd):
    # Given a run that stopped after its first epoch
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=8))
    run_dir = tmp_path / "runs" / "resumable"
    assert run(["train", "--data", str(data), "--run-dir", str(run_dir), "--epochs", "1",
                *FAST]) == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    capfd.readouterr()

    # When it is relaunched with the same run dir and a larger epoch budget
    assert run(["train", "--data", str(data), "--run-dir", str(run_dir), "--epochs", "2",
                *FAST]) == 0

    # Then it continues at epoch 2 instead of starting over, keeping epoch 1's history
    out, _ = capfd.readouterr()
    assert "resuming from the checkpoint of epoch 1" in out
    second = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    assert second["resumed_at_epochs"] == [2] and first["resumed_at_epochs"] == []


def test_relaunch_with_different_data_settings_is_refused(ray_cluster, tmp_path, capsys):
    # Given a run directory holding a run with seed 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"seed": 0}))
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=4))

    # When a run with another split seed is launched into it
    code = run(["train", "--data", str(data), "--run-dir", str(run_dir), "--seed", "7", *FAST])

    # Then it fails with a one-line reason instead of mixing two experiments
    assert code == 1
    assert "different" in capsys.readouterr().err


def test_missing_data_fails_fast_with_the_uri(ray_cluster, tmp_path, capsys):
    # Given a data path that does not exist
    missing = tmp_path / "nowhere"

    # When training on it
    code = run(["train", "--data", str(missing), "--run-dir", str(tmp_path / "r"), *FAST])

    # Then the job exits non-zero naming the path
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and len(err.splitlines()) == 1
