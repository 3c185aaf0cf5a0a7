"""MODEL_CARD.md is a pure function of metrics.json content."""

from __future__ import annotations

import numpy as np

from brainray import calibration as cal
from brainray.config import DEFAULT_CLASSES
from brainray.metrics import classification_metrics
from brainray.model_card import render_model_card


def _metrics(with_trust: bool = True) -> dict:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    logits = rng.normal(size=(len(y), 4))
    logits[np.arange(len(y)), y] += 2.5
    logits[y == 0, 1] += 2.0  # glioma often looks like meningioma
    probs = cal.softmax(logits)
    metrics = classification_metrics(y, probs, DEFAULT_CLASSES)
    metrics.update(
        model_name="bn_cnn", model_id="0123456789abcdef", n_parameters=1_234_567, best_epoch=7,
        history=[{"epoch": i} for i in range(1, 10)],
        split={"n_images": 1200, "n_groups": 1100, "n_duplicate_groups": 60,
               "n_images_in_duplicate_groups": 160, "n_groups_spanning_splits": 0,
               "n_label_conflict_groups": 2,
               "counts": {"train": {c: 240 for c in DEFAULT_CLASSES},
                          "val": {c: 30 for c in DEFAULT_CLASSES},
                          "test": {c: 30 for c in DEFAULT_CLASSES}}},
        skipped_files=[{"path": "x", "error": "empty"}],
        baseline_1nn={"method": "1-NN on thumbnails", "accuracy": 0.4321, "macro_f1": 0.4},
        config={"data": "s3://b/mri", "model": "bn_cnn", "seed": 3, "patience": 6,
                "dedup_max_hamming": 2, "preprocess": {"image_size": 224}, "augment": "paper"})
    if with_trust:
        frame = {"path": [str(i) for i in range(len(y))], "label": y, "probs": list(probs)}
        import pandas as pd

        result = cal.calibrate_run(pd.DataFrame(frame), pd.DataFrame(frame), 0.99)
        metrics.update(result.report)
        metrics["shortcut"] = {"background_only": {"balanced_accuracy": 0.61},
                               "brain_only": {"balanced_accuracy": 0.9},
                               "chance_balanced_accuracy": 0.25, "shortcut_suspected": True}
    return metrics


def test_model_card_has_every_section_with_numbers_from_the_metrics():
    metrics = _metrics()
    card = render_model_card(metrics)
    for heading in ("# Model card", "## Intended use", "## Data and split", "## Test metrics",
                    "## Calibration and abstention", "## Known failure modes",
                    "## Limitations"):
        assert heading in card, heading
    assert "not for diagnosis" in card.lower()
    assert "0123456789abcdef" in card and "1,234,567 parameters" in card
    assert "160 images" in card and "60 groups" in card  # duplicate handling
    assert "| test | 30 | 30 | 30 | 30 | 120 |" in card
    low, high = metrics["accuracy_ci95"]
    assert f"{100 * low:.1f}%-{100 * high:.1f}%" in card
    cm = metrics["confusion_matrix"]
    assert f"glioma predicted as meningioma {cm[0][1]}/30" in card
    assert f"T = {metrics['calibration']['temperature']:.3f}" in card
    assert f"{metrics['abstention']['threshold']:.3f}" in card
    assert "shortcut suspected" in card
    assert "43.2%" in card  # the trivial baseline


def test_model_card_without_calibration_or_shortcut_check_says_so():
    card = render_model_card(_metrics(with_trust=False))
    assert "Not calibrated" in card and "--shortcut-check" in card


def test_model_card_names_the_precision_the_epochs_ran_in():
    metrics = _metrics(with_trust=False)
    metrics["config"]["precision"] = "auto"
    metrics["history"] = [{"epoch": 1, "precision": "bf16-stem"},
                          {"epoch": 2, "precision": "bf16-stem"}, {"epoch": 3, "precision": "fp32"}]
    assert "precision bf16-stem, fp32;" in render_model_card(metrics)
    metrics["history"] = [{"epoch": 1}]  # runs from before the history recorded it
    assert "precision auto;" in render_model_card(metrics)


def test_model_card_reports_the_near_duplication_left_across_the_split():
    metrics = _metrics(with_trust=False)
    card = render_model_card(metrics)
    assert "Near-duplication left across the split" not in card  # runs from before it
    metrics["near_duplicates"] = {"method": "cosine of thumbnails", "n_images": 120,
                                  "median": 0.93, "share_above_0.95": 0.25,
                                  "share_above_0.99": 0.05}
    card = render_model_card(metrics)
    assert "Near-duplication left across the split" in card
    assert "25.0% of the test images are above 0.95 and 5.0% above 0.99" in card


def test_model_card_reports_the_distinct_image_accuracy():
    metrics = _metrics(with_trust=False)
    assert "Distinct test images" not in render_model_card(metrics)  # runs from before it
    metrics["distinct_images"] = {"method": "each group once", "n_images": 90, "accuracy": 0.9,
                                  "accuracy_ci95": [0.82, 0.95],
                                  "recall": {"glioma": 0.8, "meningioma": 1.0}}
    card = render_model_card(metrics)
    assert ("Distinct test images (each group once): 90, accuracy 90.0% (95% Wilson CI "
            "82.0%-95.0%); recall glioma 0.800, meningioma 1.000.") in card


def test_model_card_states_the_recipe_ema_tta_and_initial_weights():
    metrics = _metrics(with_trust=False)
    metrics.update(recipe="default", recipe_overrides={"lr": 0.001},
                   test_time_augmentation="hflip",
                   initial_weights={"source": "s3://b/r18.pth", "sha256": "ab" * 32},
                   without_tta={"accuracy": 0.5, "macro_f1": 0.4})
    metrics["config"].update(ema_decay=0.998, optimizer="adamw", label_smoothing=0.1)
    card = render_model_card(metrics)
    assert "Recipe `default` (overridden: {'lr': 0.001})" in card
    assert "EMA of the weights (decay 0.998) shipped" in card
    assert "test-time augmentation hflip" in card
    assert "initial weights s3://b/r18.pth (sha256 " + "ab" * 32 + ")" in card
    assert "Without test-time augmentation (hflip) the same model scores accuracy 50.0%" in card


def test_the_card_says_when_cross_validation_rejected_the_fitted_temperature():
    metrics = _metrics()
    metrics["calibration"].update(
        temperature=1.0, fitted_temperature=0.815, val_errors=4,
        rejected_by_cross_validation=True,
        cross_validated_nll={"folds": 5, "at_1": 0.0206, "fitted": 0.0231})
    card = render_model_card(metrics)
    assert ("T = 1.000 (the fit, T = 0.815 from 4 validation errors, lost to T = 1 on held-out "
            "folds: NLL 0.0231 against 0.0206, so it is not used)") in card
