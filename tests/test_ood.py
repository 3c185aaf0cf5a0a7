"""The out-of-distribution guard: photos, blank pages and documents vs gray scans and real MRI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from brainray import ood
from brainray.config import PreprocessConfig
from brainray.data import sample_data_dir
from brainray.presets import InferencePreset
from brainray.transforms import (
    decode_image,
    preprocess_bytes,
    preprocess_image,
    resize_image,
)
from tests.conftest import synthetic_scan

SIZE = 64
CONFIG = PreprocessConfig(image_size=SIZE)


def colour_photo(size: int = 96) -> Image.Image:
    """Photo-like: a blue sky over green grass with a red object, plus sensor noise."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((size, size, 3), np.float32)
    pixels[: size // 2] = (90, 150, 230)
    pixels[size // 2:] = (60, 160, 50)
    pixels[size // 3: size // 2 + 10, size // 3: size // 2] = (200, 40, 30)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def text_on_white(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for row in range(6):
        draw.text((4, 4 + row * 15), "Patient report: no findings", fill="black")
    return image


def _batch(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Gray model inputs and their colour fractions, as scoring computes them."""
    pairs = [InferencePreset(CONFIG).image(image) for image in images]
    return np.stack([g for g, _ in pairs]), np.array([c for _, c in pairs])


def _check(images: list[Image.Image], reference: dict | None = None):
    gray, colour = _batch(images)
    return ood.check(gray, reference, colour)


@pytest.mark.parametrize("image, reason", [
    (colour_photo(), ood.REASON_COLOUR),
    (Image.new("L", (80, 80), 0), ood.REASON_CONSTANT),
    (Image.new("L", (80, 80), 128), ood.REASON_CONSTANT),
    (Image.new("RGB", (80, 80), "white"), ood.REASON_CONSTANT),
    (text_on_white(), ood.REASON_INTENSITY),
])
def test_non_mri_inputs_are_flagged_with_a_reason(image, reason):
    flags, reasons = _check([image])
    assert flags.tolist() == [True]
    assert reason in reasons[0]


def test_synthetic_gray_scans_in_any_mode_pass():
    scans = [synthetic_scan(label, i, 48, mode) for label in range(4) for i in range(3)
             for mode in ("L", "RGB")]
    flags, reasons = _check(scans)
    assert not flags.any(), reasons


def test_every_sample_mri_passes_with_default_and_learned_ranges():
    files = sorted(p for p in Path(sample_data_dir()).glob("*/*") if p.is_file())
    images = np.stack([preprocess_bytes(p.read_bytes(), CONFIG) for p in files])
    assert len(images) >= 100
    flags, reasons = ood.check(images)
    assert not flags.any(), [r for r in reasons if r]
    reference = ood.reference_from_features(ood.image_features(images))
    low, high = reference["mean_range"]
    assert low <= reference["train_mean_range"][0] and high >= reference["train_mean_range"][1]
    assert not ood.check(images, reference)[0].any()
    # and the learned range still rejects a document
    assert _check([text_on_white()], reference)[0].all()


def test_features_of_an_empty_batch_and_bad_shapes():
    assert ood.check(np.zeros((0, 8, 8), np.uint8))[0].shape == (0,)
    assert ood.check(np.zeros((0, 8, 8, 3), np.uint8))[0].shape == (0,)
    with pytest.raises(ValueError):
        ood.image_features(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        ood.image_features(np.zeros((2, 8, 8, 4), np.uint8))


def test_features_match_a_full_resolution_numpy_reference_on_real_mri():
    """Features come from every other pixel, in torch; on real scans they must agree with the
    full-image definition far inside the rules' margins (0.02 std floor vs >= 0.10 for MRI)."""
    paths = sorted(Path(sample_data_dir()).glob("*/*"))[:24]
    config = PreprocessConfig()
    decoded = [decode_image(p.read_bytes(), config.max_image_pixels) for p in paths]
    images = np.stack([preprocess_image(image, config) for image in decoded])
    rgb = np.stack([np.asarray(resize_image(image, config).convert("RGB"))
                    for image in decoded])
    gray = images.reshape(len(images), -1).astype(np.float64) / 255.0
    spread = rgb.max(axis=3).astype(np.int16) - rgb.min(axis=3)
    features = ood.image_features(images)
    np.testing.assert_allclose(features["mean"], gray.mean(axis=1), atol=0.01)
    np.testing.assert_allclose(features["std"], gray.std(axis=1), atol=0.01)
    np.testing.assert_allclose(ood.colour_fractions(rgb),
                               (spread > ood.SATURATION_LEVEL * 255).reshape(len(images), -1)
                               .mean(axis=1), atol=0.01)


def test_decide_on_precomputed_features_equals_check():
    images, colour = _batch([colour_photo(), text_on_white(), Image.new("L", (80, 80), 0)])
    reference = {"mean_range": [0.0, 0.5]}
    flags, reasons = ood.check(images, reference, colour)
    decided_flags, decided_reasons = ood.decide(ood.image_features(images, colour), reference)
    assert flags.tolist() == decided_flags.tolist() == [True, True, True]
    assert reasons == decided_reasons
