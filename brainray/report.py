"""The report files of a training run or an evaluation: metrics.json, the plots, the
predictions table and report.html with its gallery of the most confident mistakes, written to a
run or output directory (the I/O edge; metrics.py and html_report.py stay pure)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainray import html_report, storage
from brainray import metrics as metric_fns
from brainray.checkpoint import (
    ACCURACY_PNG,
    CONFUSION_PNG,
    LOSS_PNG,
    METRICS_FILE,
    PREDICTIONS_FILE,
    model_from_checkpoint,
    temperature_of,
)
from brainray.config import COL_ERROR, COL_LABEL, COL_PATH, COL_PROBS, StorageOptions
from brainray.console import say
from brainray.data import take_images
from brainray.explain import GradCam, render_overlay
from brainray.html_report import Gallery, Mistake

GALLERY_SIZE = 12  # mistakes shown in report.html


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
                 history: list[dict] | None = None) -> dict[str, bytes]:
    """metrics.json, confusion matrix, predictions and (with a history) accuracy/loss curves;
    returns the PNGs written, by file name, for report.html."""
    storage.write_json(storage.join(output_uri, METRICS_FILE), report, options)
    figures = {CONFUSION_PNG: metric_fns.render_confusion_matrix(report["confusion_matrix"],
                                                                 report["classes"])}
    if history:
        figures[ACCURACY_PNG] = metric_fns.render_accuracy_curve(history)
        figures[LOSS_PNG] = metric_fns.render_loss_curve(history)
    for name, png in figures.items():
        storage.write_bytes(storage.join(output_uri, name), png, options)
    if predictions is not None:
        buffer = predictions.to_parquet(index=False)
        storage.write_bytes(storage.join(output_uri, PREDICTIONS_FILE), buffer, options)
    return figures


def most_confident_mistakes(predictions: pd.DataFrame, limit: int = GALLERY_SIZE
                            ) -> pd.DataFrame:
    """The wrong predictions, most confident first (ties by path): path, label, predicted,
    confidence."""
    probs = np.stack(predictions[COL_PROBS].to_numpy())
    frame = pd.DataFrame({COL_PATH: predictions[COL_PATH].to_numpy(),
                          COL_LABEL: predictions[COL_LABEL].to_numpy(),
                          "predicted": probs.argmax(1), "confidence": probs.max(1)})
    wrong = frame[frame["predicted"] != frame[COL_LABEL]]
    return wrong.sort_values(["confidence", COL_PATH], ascending=[False, True],
                             kind="stable").head(limit).reset_index(drop=True)


def _overlays(checkpoint: dict, images: np.ndarray, targets: np.ndarray
              ) -> list[tuple[bytes, bool]]:
    """Untitled overlays (the page prints each one's labels beside it), and whether each map is
    empty (no positive evidence for the class)."""
    cam = GradCam(model_from_checkpoint(checkpoint), temperature_of(checkpoint))
    heat, _, _ = cam.explain_images(images, targets)
    return [(render_overlay(image, h), not h.any()) for image, h in zip(images, heat,
                                                                        strict=True)]


def mistake_gallery(dataset, predictions: pd.DataFrame, checkpoint: dict,
                    limit: int = GALLERY_SIZE) -> Gallery:
    """The most confident mistakes with Grad-CAM overlays of their (wrong) predicted class. Only
    their images are fetched from `dataset` (rows with path and image). A failure is printed and
    leaves a gallery that says why: it never fails the job."""
    classes = checkpoint["classes"]
    try:
        wrong = most_confident_mistakes(predictions, limit)
        if wrong.empty:
            return Gallery()
        images = take_images(dataset, wrong[COL_PATH])
        overlays = _overlays(checkpoint, np.stack([images[p] for p in wrong[COL_PATH]]),
                             wrong["predicted"].to_numpy())
    except Exception as exc:  # the gallery is an extra; the run's numbers are already written
        say(f"warning: no mistakes gallery in the report: {exc}")
        return Gallery(error=f"{type(exc).__name__}: {exc}")
    return Gallery(tuple(
        Mistake(path, classes[t], classes[p], float(c), png, empty)
        for path, t, p, c, (png, empty) in zip(wrong[COL_PATH], wrong[COL_LABEL],
                                               wrong["predicted"], wrong["confidence"], overlays,
                                               strict=True)))


def write_html_report(output_uri: str, report: dict, figures: dict[str, bytes],
                      options: StorageOptions, gallery: Gallery | None = None) -> None:
    """report.html beside metrics.json. A failure is printed, never raised: the run's other
    files are already written and must not be thrown away for a page."""
    uri = storage.join(output_uri, html_report.REPORT_FILE)
    try:
        storage.write_text(uri, html_report.render_run_report(report, figures, gallery), options)
    except Exception as exc:
        say(f"warning: {storage.redact(uri)} was not written: {exc}")


def skipped_files(index: pd.DataFrame) -> list[dict]:
    """Files that could not be used, with their URI and the reason, for the report."""
    bad = index[index[COL_ERROR] != ""]
    return [{"path": p, "error": e} for p, e in zip(bad[COL_PATH], bad[COL_ERROR], strict=True)]
