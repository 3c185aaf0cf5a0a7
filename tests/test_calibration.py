"""Temperature scaling, the review threshold, their plots, and checkpoints with and without them."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from brainray import calibration as cal
from brainray.checkpoint import (
    DEFAULT_REVIEW_THRESHOLD,
    deserialize,
    make_checkpoint,
    review_threshold_of,
    serialize,
    temperature_of,
    with_fields,
)
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.metrics import expected_calibration_error
from brainray.model import build_model
from brainray.predict import Predictor
from tests.conftest import synthetic_scan


def _overconfident(n: int = 3000, k: int = 4, true_t: float = 2.5, seed: int = 0):
    """Labels drawn from softmax(logits / true_t), but reported probabilities softmax(logits):
    a model that is overconfident by exactly true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 4
    p_true = cal.softmax(logits / true_t)
    y = np.array([rng.choice(k, p=row) for row in p_true])
    return cal.softmax(logits), y


def test_fit_temperature_recovers_the_true_temperature_and_lowers_nll():
    probs, y = _overconfident(true_t=2.5)
    fit = cal.fit_temperature(probs, y)
    assert fit["temperature"] == pytest.approx(2.5, rel=0.12)
    assert fit["val_nll_after"] < fit["val_nll_before"]
    assert not fit["at_bound"]


def test_temperature_keeps_the_predicted_class_and_one_is_identity():
    probs, _ = _overconfident(n=200)
    scaled = cal.apply_temperature(probs, 3.0)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert np.allclose(scaled.sum(1), 1.0)
    assert scaled.max(1).mean() < probs.max(1).mean()  # T > 1 softens
    assert np.allclose(cal.apply_temperature(probs, 1.0), probs, atol=1e-9)
    with pytest.raises(ValueError):
        cal.apply_temperature(probs, 0.0)


def _few_confident_errors(n: int = 570, errors: int = 4, seed: int = 0):
    """A validation split like seed 1's: confidently right but for a few confident mistakes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += rng.uniform(4, 12, n)
    for i in rng.choice(n, errors, replace=False):
        logits[i] = 0.0
        logits[i, (y[i] + 1) % 4] = 6.0
    return cal.softmax(logits), y


def test_a_sharpening_fit_on_a_few_errors_is_rejected_by_cross_validation():
    # Given a validation split whose in-sample fit is a T below 1
    probs, y = _few_confident_errors()
    fit = cal.fit_temperature(probs, y)
    assert fit["fitted_temperature"] < 1 and fit["val_errors"] == 4
    # Then on held-out folds that T does worse than none, and T = 1 is used
    held_out = fit["cross_validated_nll"]
    assert held_out["fitted"] > held_out["at_1"]
    assert fit["rejected_by_cross_validation"] and fit["temperature"] == 1.0
    assert fit["val_nll_after"] == fit["val_nll_before"]


def test_a_softening_fit_is_used_without_the_held_out_check():
    # Given an overconfident model (a T above 1 fits), on a split small enough to fold
    probs, y = _overconfident(n=40, true_t=2.5)
    fit = cal.fit_temperature(probs, y)
    # Then its T is used as fitted, and no cross-validation was asked of it
    assert fit["fitted_temperature"] > 1 and fit["temperature"] == fit["fitted_temperature"]
    assert fit["cross_validated_nll"] is None and not fit["rejected_by_cross_validation"]


def test_perfect_validation_set_stops_at_the_lower_bound_and_says_so():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    fit = cal.fit_temperature(probs, np.array([0, 1, 0]))
    assert fit["temperature"] == pytest.approx(cal.TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert fit["at_bound"]


def test_review_threshold_is_the_smallest_reaching_the_target():
    # confidences, most confident first; correct except the 0.8 and the 0.5 images
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    ok = np.array([1, 1, 1, 0, 1, 1, 0], dtype=bool)
    # top-3 accuracy 1.0; top-6 accuracy 5/6 = 0.833; top-7 = 5/7
    assert cal.review_threshold(conf, ok, 1.0)["threshold"] == 0.9
    chosen = cal.review_threshold(conf, ok, 0.8)
    assert chosen == {"threshold": 0.6, "coverage": 6 / 7, "accuracy": 5 / 6, "achieved": True,
                      "target_accuracy": 0.8, "n": 7}
    assert cal.review_threshold(conf, ok, 0.7)["threshold"] == 0.5  # everything accepted


def test_review_threshold_counts_ties_as_one_operating_point():
    conf = np.array([0.9, 0.9, 0.8])
    ok = np.array([True, False, True])
    # accepting only "the first 0.9" is impossible: both 0.9 images are in or out together
    result = cal.review_threshold(conf, ok, 0.6)
    assert result["threshold"] == 0.8 and result["accuracy"] == pytest.approx(2 / 3)


def test_unreachable_target_sends_everything_to_review():
    result = cal.review_threshold(np.array([0.9, 0.8]), np.array([False, False]), 0.99)
    assert result["threshold"] == 1.0 and not result["achieved"] and result["coverage"] == 0.0


def _frame(probs, y, prefix="img"):
    return pd.DataFrame({"path": [f"{prefix}{i:05d}" for i in range(len(y))], "label": y,
                         "probs": list(probs.astype(np.float32))})


def test_calibrate_run_reports_before_and_after_on_test_and_plots():
    p_val, y_val = _overconfident(n=2000, seed=1)
    p_test, y_test = _overconfident(n=2000, seed=2)
    result = cal.calibrate_run(_frame(p_val, y_val), _frame(p_test, y_test), 0.95)
    report = result.report["calibration"]
    assert report["temperature"] == pytest.approx(2.5, rel=0.15)
    assert report["ece_after"] < report["ece_before"] / 2
    assert report["nll_after"] < report["nll_before"]
    assert report["ece_before"] == pytest.approx(expected_calibration_error(y_test, p_test),
                                                 abs=1e-6)
    abstention = result.report["abstention"]
    assert abstention["achieved_on_val"] and abstention["val_accuracy"] >= 0.95
    assert 0 < abstention["test_coverage"] < 1 and abstention["test_accuracy"] > 0.85
    assert result.review_threshold == abstention["threshold"]
    calibrated = np.stack(result.test_predictions["probs"].to_numpy())
    assert (calibrated.argmax(1) == p_test.argmax(1)).all()
    assert result.reliability_png.startswith(b"\x89PNG")
    assert result.coverage_png.startswith(b"\x89PNG")


# --- checkpoints: old ones keep working, new ones carry temperature and threshold -------------


def _checkpoint(image_size: int = 32) -> dict:
    torch.manual_seed(0)
    return make_checkpoint(build_model("paper_cnn", 4, image_size), model_name="paper_cnn",
                           classes=DEFAULT_CLASSES, preprocess=PreprocessConfig(image_size),
                           config={}, metrics={}, epoch=1)


def test_checkpoint_without_new_fields_behaves_as_before(tmp_path):
    old = _checkpoint()
    assert "temperature" not in old and "review_threshold" not in old
    assert temperature_of(old) == 1.0
    assert review_threshold_of(old) == DEFAULT_REVIEW_THRESHOLD == 0.7
    assert review_threshold_of(old, 0.4) == 0.4
    path = tmp_path / "model.pt"
    path.write_bytes(serialize(old))
    predictor = Predictor(str(path), StorageOptions())
    images = np.stack([np.asarray(synthetic_scan(i, i, 32, "RGB")) for i in range(4)])
    from brainray.checkpoint import model_from_checkpoint
    from brainray.transforms import to_model_input

    with torch.inference_mode():
        expected = torch.softmax(model_from_checkpoint(old)(
            to_model_input(torch.from_numpy(images))), 1).numpy()
    assert np.array_equal(predictor.predict(images), expected)
    assert predictor.review_threshold is None and predictor.ood_reference is None


def test_calibrating_makes_a_new_model_id_over_the_same_weights(tmp_path):
    old = _checkpoint()
    new = with_fields(old, temperature=2.0, review_threshold=0.83,
                      calibration={"temperature": 2.0, "ece_after": 0.01})
    data = serialize(new)
    raw = torch.load(io.BytesIO(data), weights_only=True)  # plain values: still weights_only
    assert raw["temperature"] == 2.0
    loaded = deserialize(data)
    # the weights are the same, but what the model outputs is not: a new model_id
    assert loaded["weights_id"] == old["weights_id"]
    assert loaded["model_id"] != old["model_id"]
    assert temperature_of(loaded) == 2.0 and review_threshold_of(loaded) == 0.83
    (tmp_path / "old.pt").write_bytes(serialize(old))
    (tmp_path / "new.pt").write_bytes(data)
    images = np.stack([np.asarray(synthetic_scan(i, i, 32, "RGB")) for i in range(4)])
    p_old = Predictor(str(tmp_path / "old.pt"), StorageOptions()).predict(images)
    p_new = Predictor(str(tmp_path / "new.pt"), StorageOptions()).predict(images)
    assert np.allclose(p_new, cal.apply_temperature(p_old, 2.0), atol=1e-5)


def test_bad_temperature_in_a_checkpoint_is_refused():
    from brainray.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        temperature_of({"temperature": -1.0})
