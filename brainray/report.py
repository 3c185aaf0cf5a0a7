"""The report files of a training run or an evaluation: metrics.json, the plots and the
predictions table, written to a run or output directory (the I/O edge; metrics.py stays pure)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainray import metrics as metric_fns
from brainray import storage
from brainray.checkpoint import (
    ACCURACY_PNG,
    CONFUSION_PNG,
    LOSS_PNG,
    METRICS_FILE,
    PREDICTIONS_FILE,
)
from brainray.config import COL_ERROR, COL_LABEL, COL_PATH, COL_PROBS, StorageOptions


def compute_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict:
    probs = np.stack(predictions[COL_PROBS].to_numpy()).astype(np.float64)
    return metric_fns.classification_metrics(predictions[COL_LABEL].to_numpy(), probs, classes)


def predictions_table(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Flat per-image predictions for researchers: path, true and predicted class, probabilities."""
    probs = np.stack(predictions[COL_PROBS].to_numpy())
    table = pd.DataFrame({
        "path": predictions[COL_PATH].to_numpy(),
        "true_label": [classes[i] for i in predictions[COL_LABEL]],
        "predicted_label": [classes[i] for i in probs.argmax(1)],
        "confidence": probs.max(1),
    })
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i]
    return table


def write_report(output_uri: str, report: dict, options: StorageOptions,
                 predictions: pd.DataFrame | None = None,
                 history: list[dict] | None = None) -> None:
    """metrics.json, confusion matrix, predictions and (with a history) accuracy/loss curves."""
    storage.write_json(storage.join(output_uri, METRICS_FILE), report, options)
    storage.write_bytes(storage.join(output_uri, CONFUSION_PNG),
                        metric_fns.render_confusion_matrix(report["confusion_matrix"],
                                                           report["classes"]), options)
    if history:
        storage.write_bytes(storage.join(output_uri, ACCURACY_PNG),
                            metric_fns.render_accuracy_curve(history), options)
        storage.write_bytes(storage.join(output_uri, LOSS_PNG),
                            metric_fns.render_loss_curve(history), options)
    if predictions is not None:
        buffer = predictions.to_parquet(index=False)
        storage.write_bytes(storage.join(output_uri, PREDICTIONS_FILE), buffer, options)


def skipped_files(index: pd.DataFrame) -> list[dict]:
    """Files that could not be used, with their URI and the reason, for the report."""
    bad = index[index[COL_ERROR] != ""]
    return [{"path": p, "error": e} for p, e in zip(bad[COL_PATH], bad[COL_ERROR], strict=True)]
