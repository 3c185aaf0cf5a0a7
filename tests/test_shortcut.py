"""The brain mask and the shortcut report (pure; the Ray path is in test_trust_pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from brainray import shortcut
from brainray.config import COL_IMAGE, DEFAULT_CLASSES


def synthetic_head(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipse (the head) with a dark ventricle inside, on noisy black background;
    returns the RGB image and the true (filled) head mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    head = ((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.42) ** 2 <= 1.0
    ventricle = ((xx - 0.5) / 0.06) ** 2 + ((yy - 0.45) / 0.1) ** 2 <= 1.0
    pixels = rng.integers(0, 12, (size, size)).astype(np.float32)  # background noise
    pixels[head] = 90 + 80 * rng.random(head.sum())
    pixels[ventricle] = 8  # as dark as the background: a hole to fill
    # a bright text label in the corner, outside the head (a classic shortcut carrier)
    pixels[4:10, 4:30] = 255
    gray = np.clip(pixels, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2), head


def test_brain_mask_recovers_the_head_fills_holes_and_drops_the_label():
    image, truth = synthetic_head()
    mask = shortcut.brain_mask(image)
    # the smoothing makes the mask about one pixel generous: no head pixel is left in the
    # "background only" image
    assert not (truth & ~mask).any()
    assert (mask & ~truth).sum() < 0.08 * truth.sum()
    assert mask[58, 64]  # inside the ventricle: filled
    assert not mask[6:9, 5:29].any()  # the corner label is not the largest component


def test_brain_mask_of_a_black_image_is_empty():
    assert not shortcut.brain_mask(np.zeros((32, 32, 3), np.uint8)).any()


def test_masking_keeps_only_the_requested_part():
    image, _ = synthetic_head()
    batch = {COL_IMAGE: image[None], "path": np.array(["a"])}
    brain = shortcut.mask_batch(batch, keep="brain_only")[COL_IMAGE][0]
    background = shortcut.mask_batch(batch, keep="background_only")[COL_IMAGE][0]
    mask = shortcut.brain_mask(image)
    assert (brain[~mask] == 0).all() and (brain[mask] == image[mask]).all()
    assert (background[mask] == 0).all() and (background[~mask] == image[~mask]).all()
    assert (image != 0).any() and batch[COL_IMAGE][0].any()  # the input is not modified
    with pytest.raises(ValueError):
        shortcut.mask_images(image[None], "skull")


def _onehot(pred, k=4):
    probs = np.full((len(pred), k), 0.1 / (k - 1))
    probs[np.arange(len(pred)), pred] = 0.9
    return probs


def test_report_flags_a_model_that_classifies_the_background():
    y = np.repeat(np.arange(4), 10)
    rng = np.random.default_rng(0)
    good = _onehot(y)
    chance = _onehot(rng.integers(0, 4, len(y)))
    honest = shortcut.shortcut_report(y, good, good, chance, list(DEFAULT_CLASSES),
                                      np.full(len(y), 0.4))
    cheating = shortcut.shortcut_report(y, good, chance, good, list(DEFAULT_CLASSES))
    assert not honest["shortcut_suspected"] and cheating["shortcut_suspected"]
    assert honest["brain_only"]["accuracy"] == 1.0
    assert cheating["background_only"]["balanced_accuracy"] == 1.0
    assert honest["chance_balanced_accuracy"] == 0.25
    assert honest["mean_brain_fraction"] == pytest.approx(0.4)


def test_constant_majority_prediction_is_not_a_shortcut():
    # an imbalanced set where background-only images all get the majority class: plain
    # accuracy is 70% but balanced accuracy is chance, so nothing is flagged
    y = np.array([2] * 70 + [0] * 10 + [1] * 10 + [3] * 10)
    constant = _onehot(np.full(len(y), 2))
    report = shortcut.shortcut_report(y, constant, constant, constant, list(DEFAULT_CLASSES))
    assert report["background_only"]["accuracy"] == 0.7
    assert report["background_only"]["balanced_accuracy"] == 0.25
    assert not report["shortcut_suspected"]
