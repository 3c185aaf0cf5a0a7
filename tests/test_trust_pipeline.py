"""End to end on the shared local Ray cluster: a training run calibrates itself, chooses a review
threshold, stores an OOD reference and writes its model card; evaluate runs the shortcut check;
scoring uses all of it."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch
from PIL import Image

from brainray.checkpoint import deserialize, model_identity, weights_id
from brainray.cli import run
from brainray.explain import review_overlay_name
from tests.conftest import encode, synthetic_scan, write_tree
from tests.test_ood import colour_photo

pytestmark = [pytest.mark.ray, pytest.mark.slow]

def test_trained_run_is_calibrated_checked_and_scored_with_its_guards(trained_run, tmp_path):
    # Given a tiny labeled dataset, When training two epochs with target accuracy 0.9 (fixture)
    data, run_dir = trained_run.data, trained_run.run_dir

    # Then metrics.json has calibration and abstention, with plots and a model card
    metrics = json.loads((run_dir / "metrics.json").read_text())
    calibration, abstention = metrics["calibration"], metrics["abstention"]
    for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after"):
        assert isinstance(calibration[key], float), key
    assert abstention["target_accuracy"] == 0.9 and 0 <= abstention["test_coverage"] <= 1
    for name in ("reliability.png", "coverage.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    card = (run_dir / "MODEL_CARD.md").read_text()
    assert "not for diagnosis" in card.lower() and metrics["model_id"] in card

    # And model.pt carries them; its weights_id is the hash of its weights, its model_id covers
    # the calibration and guards too
    raw = (run_dir / "model.pt").read_bytes()
    checkpoint = deserialize(raw)
    assert torch.load(io.BytesIO(raw), weights_only=True)["temperature"] == calibration[
        "temperature"]
    assert checkpoint["review_threshold"] == abstention["threshold"]
    assert checkpoint["weights_id"] == weights_id(checkpoint["state_dict"])
    assert checkpoint["model_id"] == model_identity(checkpoint) == metrics["model_id"]
    low, high = checkpoint["ood_reference"]["mean_range"]
    assert 0 <= low < high <= 1

    # When evaluating with the shortcut check
    assert run(["evaluate", "--model", str(run_dir), "--data", str(data), "--output",
                str(tmp_path / "eval"), "--no-gpu", "--shortcut-check"]) == 0

    # Then both masked accuracies and the verdict are reported, with the calibrated model
    evaluation = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    shortcut = evaluation["shortcut"]
    assert evaluation["temperature"] == calibration["temperature"]
    assert shortcut["n_images"] == evaluation["n_images"] == 32
    for mode in ("brain_only", "background_only"):
        assert 0 <= shortcut[mode]["balanced_accuracy"] <= 1
    assert isinstance(shortcut["shortcut_suspected"], bool)

    # When scoring gray scans, a colour photo and a blank image, with review overlays
    inputs = write_tree(tmp_path / "inbox", {
        "scan_a.png": encode(synthetic_scan(0, 500)), "scan_b.png": encode(synthetic_scan(2, 501)),
        "photo.jpg": encode(colour_photo(), "JPEG"),
        "blank.png": encode(Image.new("L", (48, 48), 0))})
    review_dir = tmp_path / "review"
    assert run(["score", "--model", str(run_dir), "--input", str(inputs), "--output",
                str(tmp_path / "scores"), "--no-gpu", "--explain-review-dir",
                str(review_dir)]) == 0

    # Then the non-MRI inputs are out of distribution, the review threshold is the checkpoint's,
    # and each row sent to review has a Grad-CAM overlay
    scores = pd.read_parquet(tmp_path / "scores" / "scores")
    scores.index = [uri.rsplit("/", 1)[-1] for uri in scores.uri]
    columns = list(scores.columns)  # columns are only ever added: after the original ones
    assert columns.index("out_of_distribution") > columns.index("run_id")
    assert scores.loc[["photo.jpg", "blank.png"], "out_of_distribution"].all()
    assert not scores.loc[["scan_a.png", "scan_b.png"], "out_of_distribution"].any()
    expected_review = (scores.confidence < checkpoint["review_threshold"]) | \
        scores.out_of_distribution
    assert (scores.needs_review == expected_review).all()
    assert sorted(p.name for p in review_dir.glob("*.png")) == sorted(
        review_overlay_name(sha, None) for sha in scores[scores.needs_review].content_sha256)
