"""Out-of-distribution guard: inputs that are clearly not brain MRI are flagged, not given a class.

A classifier always answers with one of its classes, even for a holiday photo. Scoring therefore
checks each preprocessed image (the model's gray input, and the colour it had before the
conversion to gray) with three simple, explainable rules and sets `out_of_distribution` (and
`needs_review`) when any fires:

1. **colour** - MRI is gray. More than 5% of pixels have a channel spread (max - min of R, G, B)
   above 15% of full scale. (The 120 sample MRIs: at most 1.8% of pixels above that level.)
2. **near-constant** - the gray intensity's standard deviation is below 0.02 of full scale: blank,
   black or white pages, flat fills. (Sample MRIs: at least 0.10.)
3. **intensity** - the mean gray intensity is outside the training images' range widened by 0.15
   on each side (stored in the checkpoint as `ood_reference`; without one [0, 0.70]). Catches text
   on white paper, documents and screenshots, which are mostly white, while MRI is mostly black
   background. (Sample MRIs: mean 0.07 to 0.48.)

It is a guard against gross mistakes (wrong folder, wrong modality export, scanned paperwork), not
a detector of subtle shift: a grayscale photograph or a CT slice can pass it.
"""

from __future__ import annotations

import numpy as np
import torch

SATURATION_LEVEL = 0.15  # channel spread that counts a pixel as coloured
MAX_COLOUR_FRACTION = 0.05
MIN_STD = 0.02
MEAN_MARGIN = 0.15
DEFAULT_MEAN_RANGE = (0.0, 0.70)

REASON_COLOUR = "colour image (MRI is grayscale)"
REASON_CONSTANT = "near-constant image"
REASON_INTENSITY = "mean intensity outside the training range"


def _subsampled(images: np.ndarray) -> torch.Tensor:
    """Every other pixel each way (a 112x112 grid at 224 px), flattened per image: plenty for
    whole-image statistics. torch is vectorised and multi-threaded where numpy is not: scoring
    checks every image, and the full-resolution numpy version cost 3.6 ms an image, as much as
    inference itself."""
    pixels = torch.from_numpy(np.ascontiguousarray(images[:, ::2, ::2], dtype=np.uint8))
    return pixels.reshape(len(images), -1, *images.shape[3:])


def _colour_fractions(pixels: torch.Tensor) -> np.ndarray:
    spread = pixels.amax(dim=2) - pixels.amin(dim=2)  # uint8: max >= min, no wrap-around
    return (spread > SATURATION_LEVEL * 255).double().mean(dim=1).numpy()


def colour_fractions(images: np.ndarray) -> np.ndarray:
    """Per image of a uint8 (N, H, W, 3) batch: the share of pixels whose channel spread (max -
    min of R, G, B) is over SATURATION_LEVEL."""
    return _colour_fractions(_subsampled(images))


def image_features(images: np.ndarray, colour_fraction: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """Per image of a uint8 gray (N, H, W) or RGB (N, H, W, 3) batch: colour fraction, intensity
    std and mean in [0, 1]. A gray batch has colour 0 unless `colour_fraction` is given."""
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"expected (N, H, W) or (N, H, W, 3) images, got shape {images.shape}")
    n = images.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.float64)
        return {"colour_fraction": empty, "std": empty, "mean": empty}
    pixels = _subsampled(images)
    rgb = images.ndim == 4
    gray = pixels.float().mean(dim=2) if rgb else pixels.float()
    std, mean = torch.std_mean(gray.div_(255.0), dim=1, correction=0)
    if colour_fraction is None:
        colour_fraction = _colour_fractions(pixels) if rgb else np.zeros(n)
    return {"colour_fraction": np.asarray(colour_fraction, dtype=np.float64),
            "std": std.double().numpy(), "mean": mean.double().numpy()}


def reference_from_features(features: dict[str, np.ndarray]) -> dict:
    """What the checkpoint stores: the accepted mean-intensity range from the training images."""
    means = np.asarray(features["mean"], dtype=np.float64)
    if len(means) == 0:
        raise ValueError("no training images to derive an intensity range from")
    low, high = float(means.min()), float(means.max())
    return {"mean_range": [max(0.0, low - MEAN_MARGIN), min(1.0, high + MEAN_MARGIN)],
            "train_mean_range": [low, high], "n_images": int(len(means)),
            "method": "brainray.ood v1: colour fraction, gray std, mean intensity"}


def mean_range(reference: dict | None) -> tuple[float, float]:
    if reference and "mean_range" in reference:
        low, high = reference["mean_range"]
        return float(low), float(high)
    return DEFAULT_MEAN_RANGE


def check(images: np.ndarray, reference: dict | None = None,
          colour_fraction: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Flags (bool per image) and a reason per image ("" when in distribution)."""
    return decide(image_features(images, colour_fraction), reference)


def decide(features: dict[str, np.ndarray], reference: dict | None = None
           ) -> tuple[np.ndarray, list[str]]:
    """The rules applied to precomputed features: scoring computes them in its CPU read tasks,
    beside decoding, so the inference actors (one per GPU) only compare three numbers."""
    low, high = mean_range(reference)
    reasons = []
    for colour, std, mean in zip(features["colour_fraction"], features["std"], features["mean"],
                                 strict=True):
        found = []
        if colour > MAX_COLOUR_FRACTION:
            found.append(REASON_COLOUR)
        if std < MIN_STD:
            found.append(REASON_CONSTANT)
        if not low <= mean <= high:
            found.append(f"{REASON_INTENSITY} ({mean:.2f} not in [{low:.2f}, {high:.2f}])")
        reasons.append("; ".join(found))
    return np.array([bool(r) for r in reasons], dtype=bool), reasons


def _features_batch(batch: dict[str, np.ndarray], *, column: str) -> dict[str, np.ndarray]:
    return image_features(batch[column])


def reference_from_dataset(dataset, column: str = "image") -> dict:
    """The reference of a Ray dataset of uint8 images (three floats per image reach the driver)."""
    features = dataset.map_batches(_features_batch, batch_size=64,
                                   fn_kwargs={"column": column}).to_pandas()
    return reference_from_features({k: features[k].to_numpy() for k in features.columns})
