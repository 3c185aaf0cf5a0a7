import json
import math

import numpy as np
import pytest

from brainray.metrics import (
    accuracy_ci95,
    classification_metrics,
    distinct_image_metrics,
    expected_calibration_error,
    format_summary,
    render_accuracy_curve,
    render_confusion_matrix,
    render_loss_curve,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["glioma", "meningioma", "notumor"]

# Hand-worked example: 8 images, 3 classes, every prediction made with confidence 0.7.
#   true: 0 0 0 1 1 1 2 2
#   pred: 0 0 1 1 1 1 2 0
# Confusion (rows true): [[2,1,0],[0,3,0],[1,0,1]] -> 6/8 correct.
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 1, 2, 0])


def _confident_probs(pred, n_classes, confidence):
    rest = (1.0 - confidence) / (n_classes - 1)
    probs = np.full((len(pred), n_classes), rest)
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def _numpy_leaves(obj):
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in _numpy_leaves(v)]
    if isinstance(obj, list):
        return [leaf for v in obj for leaf in _numpy_leaves(v)]
    return [obj] if type(obj).__module__ == "numpy" else []


def _history():
    return [
        {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.55, "val_loss": 1.0,
         "val_accuracy": 0.6},
        {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.72, "val_loss": 0.9,
         "val_accuracy": 0.7},
        {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.85, "val_loss": 0.7,
         "val_accuracy": 0.78},
    ]


def test_accuracy_and_counts_match_hand_computation():
    # given the hand-worked example
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    m = classification_metrics(Y_TRUE, probs, CLASSES)

    # then
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["n_images"] == 8
    assert m["classes"] == CLASSES


def test_per_class_precision_recall_f1_match_hand_computation():
    # given: precision = TP / column sum, recall = TP / row sum
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    per_class = classification_metrics(Y_TRUE, probs, CLASSES)["per_class"]

    # then
    expected = {
        "glioma": (2 / 3, 2 / 3, 2 / 3, 3),
        "meningioma": (3 / 4, 1.0, 6 / 7, 3),
        "notumor": (1.0, 1 / 2, 2 / 3, 2),
    }
    for name, (precision, recall, f1, support) in expected.items():
        row = per_class[name]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support


def test_macro_and_weighted_averages_match_hand_computation():
    # given
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    m = classification_metrics(Y_TRUE, probs, CLASSES)

    # then: macro is the plain mean over classes, weighted uses supports 3, 3, 2
    assert m["macro_precision"] == pytest.approx((2 / 3 + 3 / 4 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 6 / 7 + 2 / 3) / 3)
    assert m["weighted_recall"] == pytest.approx(6 / 8)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 3 * 6 / 7 + 2 * 2 / 3) / 8)
    assert m["weighted_precision"] == pytest.approx((3 * 2 / 3 + 3 * 3 / 4 + 2 * 1) / 8)


def test_confusion_matrix_rows_are_true_class_columns_are_predicted():
    # given: one glioma predicted as meningioma, one notumor predicted as glioma
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    cm = classification_metrics(Y_TRUE, probs, CLASSES)["confusion_matrix"]

    # then
    assert cm == [[2, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert cm[0][1] == 1  # true glioma -> predicted meningioma
    assert cm[1][0] == 0  # never true meningioma -> predicted glioma


def test_loss_defaults_to_mean_cross_entropy_and_passes_through_when_given():
    # given: 6 correct at p=0.7 and 2 wrong at p=0.15 on the true class
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    computed = classification_metrics(Y_TRUE, probs, CLASSES)["loss"]
    supplied = classification_metrics(Y_TRUE, probs, CLASSES, loss=0.123)["loss"]

    # then
    assert computed == pytest.approx(-(6 * math.log(0.7) + 2 * math.log(0.15)) / 8)
    assert supplied == pytest.approx(0.123)


def test_loss_clips_zero_probability_instead_of_returning_inf():
    # given a confidently wrong one-hot prediction
    probs = np.array([[0.0, 1.0], [1.0, 0.0]])

    # when
    loss = classification_metrics([0, 0], probs, ["a", "b"])["loss"]

    # then
    assert loss == pytest.approx(-math.log(1e-12) / 2)


def test_ece_is_gap_between_constant_confidence_and_accuracy():
    # given: every prediction at confidence 0.8, half of them right
    probs = np.tile([0.8, 0.2], (4, 1))
    y_true = [0, 0, 1, 1]

    # when
    ece = expected_calibration_error(y_true, probs)

    # then
    assert ece == pytest.approx(0.3)


def test_ece_weights_each_bin_separately():
    # given: two at 0.9 (both right) and two at 0.6 (one right); overall acc 0.75 == mean conf 0.75
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y_true = [0, 0, 0, 1]

    # when
    binned = expected_calibration_error(y_true, probs, n_bins=15)
    single_bin = expected_calibration_error(y_true, probs, n_bins=1)

    # then: per-bin gaps 0.1 and 0.1 each at weight 1/2, while one bin hides them
    assert binned == pytest.approx(0.1)
    assert single_bin == pytest.approx(0.0)


def test_ece_reported_in_classification_metrics():
    # given the example with confidence 0.7 and accuracy 0.75
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    m = classification_metrics(Y_TRUE, probs, CLASSES)

    # then
    assert m["ece"] == pytest.approx(0.05)


def test_ece_rejects_non_positive_bin_count():
    # given / when / then
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0], [[1.0, 0.0]], n_bins=0)


def test_perfect_predictions_give_auc_one_and_small_ece():
    # given: every image predicted correctly with confidence 0.97
    y_true = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    probs = _confident_probs(y_true, 4, 0.97)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]

    # when
    m = classification_metrics(y_true, probs, classes)

    # then
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == pytest.approx(1.0)
    assert m["roc_auc"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in m["roc_auc_per_class"].values())
    assert m["ece"] == pytest.approx(0.03)
    assert m["ece"] < 0.05


def test_absent_class_has_no_auc_but_macro_auc_is_still_computed():
    # given: four classes, but no true "pituitary" image
    y_true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 3])
    probs = _confident_probs(pred, 4, 0.7)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]

    # when
    m = classification_metrics(y_true, probs, classes)

    # then
    per_class = m["roc_auc_per_class"]
    assert per_class["pituitary"] is None
    present = [per_class[c] for c in classes[:3]]
    assert all(isinstance(v, float) for v in present)
    assert m["roc_auc"] == pytest.approx(sum(present) / 3)
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["confusion_matrix"][2] == [0, 0, 1, 1]
    assert m["per_class"]["pituitary"]["support"] == 0


def test_single_class_input_has_no_auc_at_all():
    # given: every image is glioma, so no class has both positives and negatives
    probs = _confident_probs(np.array([0, 0, 1]), 2, 0.9)

    # when
    m = classification_metrics([0, 0, 0], probs, ["glioma", "notumor"])

    # then
    assert m["roc_auc"] is None
    assert m["roc_auc_per_class"] == {"glioma": None, "notumor": None}


def test_wilson_interval_matches_known_value_and_contains_estimate():
    # given / when
    low, high = accuracy_ci95(90, 100)

    # then
    assert low == pytest.approx(0.8256, abs=1e-3)
    assert high == pytest.approx(0.9448, abs=1e-3)
    assert low < 0.9 < high
    assert isinstance(low, float) and isinstance(high, float)


def test_wilson_interval_stays_inside_unit_range_at_extremes():
    # given / when
    all_right = accuracy_ci95(10, 10)
    all_wrong = accuracy_ci95(0, 10)

    # then: unlike the Wald interval, Wilson stays within [0, 1] and is non-degenerate
    assert 0.0 < all_right[0] < all_right[1] == pytest.approx(1.0)
    assert all_wrong[0] == pytest.approx(0.0) and 0.0 < all_wrong[1] < 1.0


@pytest.mark.parametrize(("n_correct", "n"), [(1, 0), (-1, 10), (11, 10)])
def test_wilson_interval_rejects_impossible_counts(n_correct, n):
    # given / when / then
    with pytest.raises(ValueError):
        accuracy_ci95(n_correct, n)


def test_metrics_ci_contains_accuracy():
    # given
    probs = _confident_probs(Y_PRED, 3, 0.7)

    # when
    m = classification_metrics(Y_TRUE, probs, CLASSES)

    # then
    low, high = m["accuracy_ci95"]
    assert low <= m["accuracy"] <= high
    assert (low, high) == pytest.approx(accuracy_ci95(6, 8))


def test_metrics_are_plain_json_serialisable_types():
    # given: numpy inputs of various dtypes
    probs = _confident_probs(Y_PRED, 3, 0.7).astype(np.float32)

    # when
    m = classification_metrics(Y_TRUE.astype(np.int32), probs, CLASSES)
    round_tripped = json.loads(json.dumps(m))

    # then
    assert _numpy_leaves(m) == []
    assert round_tripped["confusion_matrix"] == m["confusion_matrix"]
    assert round_tripped["per_class"]["glioma"]["support"] == 3


@pytest.mark.parametrize(
    ("y_true", "probs", "classes", "message"),
    [
        ([0, 1, 0], [[0.6, 0.4], [0.3, 0.7]], ["a", "b"], "mismatched lengths"),
        ([0, 1], [[0.6, 0.4], [0.3, 0.7]], ["a", "b", "c"], "columns"),
        ([], np.empty((0, 2)), ["a", "b"], "empty"),
        ([0, 2], [[0.6, 0.4], [0.3, 0.7]], ["a", "b"], "labels"),
        ([0, 1], [[2.0, 3.0], [0.3, 0.7]], ["a", "b"], "sum to 1"),
        ([0.0, 1.0], [[0.6, 0.4], [0.3, 0.7]], ["a", "b"], "integer"),
        ([0, 1], [0.6, 0.4], ["a", "b"], "2-D"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(y_true, probs, classes, message):
    # given malformed inputs / when / then
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, probs, classes)


def test_accuracy_and_loss_curves_render_png():
    # given
    history = _history()

    # when
    images = [render_accuracy_curve(history), render_loss_curve(history)]

    # then
    for image in images:
        assert isinstance(image, bytes)
        assert image.startswith(PNG_SIGNATURE)


def test_curves_reject_empty_history():
    # given / when / then
    with pytest.raises(ValueError, match="empty"):
        render_loss_curve([])


def test_confusion_matrix_renders_png_even_with_empty_true_row():
    # given: a class with no true images, whose recall row would divide by zero
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]

    # when
    image = render_confusion_matrix(cm, CLASSES, title="Validation")

    # then
    assert isinstance(image, bytes)
    assert image.startswith(PNG_SIGNATURE)


def test_confusion_matrix_render_rejects_shape_mismatch():
    # given / when / then
    with pytest.raises(ValueError, match="does not match"):
        render_confusion_matrix([[1, 0], [0, 1]], CLASSES)


def test_format_summary_lists_headline_numbers_and_every_class():
    # given
    m = classification_metrics(Y_TRUE, _confident_probs(Y_PRED, 3, 0.7), CLASSES)

    # when
    text = format_summary(m)

    # then
    assert "0.7500" in text  # accuracy
    assert f"{m['macro_f1']:.4f}" in text
    assert f"{m['accuracy_ci95'][0]:.4f}" in text
    for name in CLASSES:
        assert name in text
    assert len(text.splitlines()) == 3 + len(CLASSES)


def test_format_summary_handles_missing_auc():
    # given: single-class input where ROC-AUC is undefined
    m = classification_metrics([0, 0], [[0.9, 0.1], [0.8, 0.2]], ["a", "b"])

    # when
    text = format_summary(m)

    # then
    assert "ROC-AUC: n/a" in text


def test_distinct_image_metrics_count_each_duplicate_group_once():
    # given 5 test images: three copies of one glioma (group 0), all misread, and two distinct
    # images read right
    y, pred, groups = [0, 0, 0, 1, 2], [1, 1, 1, 1, 2], [0, 0, 0, 1, 2]
    # when measured / then the copies count once: 2 of 3 distinct images, not 2 of 5
    result = distinct_image_metrics(y, pred, groups, CLASSES)
    assert (result["n_images"], result["accuracy"]) == (3, 2 / 3)
    assert result["accuracy_ci95"] == list(accuracy_ci95(2, 3))
    assert result["recall"] == {"glioma": 0.0, "meningioma": 1.0, "notumor": 1.0}
