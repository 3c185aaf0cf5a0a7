"""Shortcut check: does the model need the brain, or can it classify from the background?

Public MRI tumour datasets are assembled from several sources, so scanner, text overlays, padding
and field of view can correlate with the class. A model that exploits that gets a good test score
for the wrong reason. The check evaluates the model twice more on the same labeled images:

* **brain only** - everything outside the brain mask set to black;
* **background only** - the brain mask set to black (only the surroundings remain).

Brain mask (`brain_mask`), per image, on the preprocessed uint8 gray image (or the mean of an RGB
image's channels); Gaussian smoothing (sigma 1 px); threshold at 10% of the 99th-percentile
intensity (at least 5 of 255), which separates the near-black air background of MRI from the head;
a binary opening (radius ~ image size / 112 px) removes noise specks and thin bridges; the largest
connected component is kept; holes are filled (dark ventricles, necrotic tumour cores and CSF stay
inside).
It is a head mask: the skull and scalp, when visible, are part of it.

The model is flagged (`shortcut_suspected`) when its balanced accuracy (mean per-class recall,
whose chance level is 1 / number of classes whatever the class balance) on background-only
images exceeds 1.5 x chance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from brainray.config import COL_IMAGE, COL_LABEL, COL_PATH, COL_PROBS
from brainray.data import select_rows
from brainray.metrics import accuracy_ci95
from brainray.predict import predict_labeled

THRESHOLD_FRACTION = 0.10
MIN_THRESHOLD = 5.0
SUSPECT_FACTOR = 1.5
MODES = ("brain_only", "background_only")


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Boolean (H, W) head mask of a uint8 (H, W, 3) or (H, W) image; see the module docstring."""
    gray = np.asarray(image, dtype=np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    smooth = ndimage.gaussian_filter(gray, sigma=1.0)
    threshold = max(MIN_THRESHOLD, THRESHOLD_FRACTION * float(np.percentile(smooth, 99)))
    foreground = smooth > threshold
    radius = max(1, round(min(gray.shape) / 112))
    opened = ndimage.binary_opening(foreground, structure=ndimage.generate_binary_structure(2, 1),
                                    iterations=radius)
    candidate = opened if opened.any() else foreground
    labels, count = ndimage.label(candidate)
    if count == 0:
        return np.zeros(gray.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(largest)


def mask_images(images: np.ndarray, keep: str) -> tuple[np.ndarray, np.ndarray]:
    """(masked images, brain fraction per image); keep = "brain_only" or "background_only"."""
    if keep not in MODES:
        raise ValueError(f"keep must be one of {MODES}")
    out = np.array(images, copy=True)
    fractions = np.zeros(len(out), dtype=np.float64)
    for i, image in enumerate(out):
        mask = brain_mask(image)
        fractions[i] = mask.mean()
        image[~mask if keep == "brain_only" else mask] = 0
    return out, fractions


def mask_batch(batch: dict[str, np.ndarray], *, keep: str) -> dict[str, np.ndarray]:
    """Ray Data batch function: the same rows with masked images."""
    images, _ = mask_images(batch[COL_IMAGE], keep)
    return {**batch, COL_IMAGE: images}


def brain_fraction_batch(batch: dict[str, np.ndarray], *, path_column: str
                         ) -> dict[str, np.ndarray]:
    """Ray Data batch function: path and the share of the image inside the brain mask."""
    fractions = np.array([brain_mask(image).mean() for image in batch[COL_IMAGE]],
                         dtype=np.float64)
    return {path_column: batch[path_column], "brain_fraction": fractions}


def _accuracies(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    pred = probs.argmax(1)
    recalls = [float((pred[y == k] == k).mean()) for k in range(n_classes) if (y == k).any()]
    correct = int((pred == y).sum())
    return {"accuracy": correct / len(y), "accuracy_ci95": list(accuracy_ci95(correct, len(y))),
            "balanced_accuracy": float(np.mean(recalls)),
            "predicted_counts": np.bincount(pred, minlength=n_classes).tolist()}


def shortcut_report(y, probs_full, probs_brain, probs_background, classes: list[str],
                    brain_fractions=None) -> dict:
    """metrics.json's "shortcut" section from three sets of probabilities on the same images."""
    y = np.asarray(y, dtype=np.int64)
    k = len(classes)
    chance = 1.0 / k
    report = {
        "method": "evaluate on brain-only and background-only images; brain mask = smoothed "
                  "threshold at 10% of the 99th percentile + opening + largest connected "
                  "component + hole filling (brainray.shortcut)",
        "n_images": int(len(y)), "chance_balanced_accuracy": chance,
        "suspect_above_balanced_accuracy": SUSPECT_FACTOR * chance,
        "full": _accuracies(y, np.asarray(probs_full), k),
        "brain_only": _accuracies(y, np.asarray(probs_brain), k),
        "background_only": _accuracies(y, np.asarray(probs_background), k),
    }
    if brain_fractions is not None:
        fractions = np.asarray(brain_fractions, dtype=np.float64)
        report["mean_brain_fraction"] = float(fractions.mean())
        report["n_empty_masks"] = int((fractions == 0).sum())
    report["shortcut_suspected"] = bool(
        report["background_only"]["balanced_accuracy"] > SUSPECT_FACTOR * chance)
    return report


def run_shortcut_check(dataset, paths, model_uri: str, options, classes: list[str],
                       full_predictions, batch_size: int = 64, num_actors: int = 1,
                       use_gpu: bool = False) -> dict:
    """Predict brain-only and background-only versions of the images (Ray Data) and report."""
    rows = select_rows(dataset, paths, columns=(COL_PATH, COL_IMAGE, COL_LABEL))
    probs = {}
    for keep in MODES:
        masked = rows.map_batches(mask_batch, fn_kwargs={"keep": keep})
        predicted = predict_labeled(masked, paths, model_uri, options, batch_size, num_actors,
                                    use_gpu)
        aligned = pd.merge(full_predictions[[COL_PATH]], predicted, on=COL_PATH, how="left")
        probs[keep] = np.stack(aligned[COL_PROBS].to_numpy())
    fractions = (rows.map_batches(brain_fraction_batch, fn_kwargs={"path_column": COL_PATH})
                 .to_pandas().set_index(COL_PATH).loc[full_predictions[COL_PATH],
                                                      "brain_fraction"].to_numpy())
    y = full_predictions[COL_LABEL].to_numpy()
    full = np.stack(full_predictions[COL_PROBS].to_numpy())
    return shortcut_report(y, full, probs["brain_only"], probs["background_only"], classes,
                           fractions)
