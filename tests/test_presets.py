"""Tests for brainray.presets: the training and inference presets share their base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainray import ood
from brainray.checkpoint import make_checkpoint
from brainray.config import AugmentConfig, PreprocessConfig
from brainray.model import build_model
from brainray.presets import InferencePreset, TrainPreset
from brainray.transforms import preprocess_image, resize_image, to_model_input
from tests.conftest import synthetic_scan
from tests.test_ood import colour_photo

CONFIG = PreprocessConfig(image_size=64)


def test_both_presets_give_the_same_gray_image():
    scan = synthetic_scan(2, 1, 80, "RGB")
    np.testing.assert_array_equal(TrainPreset(CONFIG).image(scan),
                                  InferencePreset(CONFIG).image(scan)[0])


def test_gray_input_carries_no_colour_and_equals_the_models_input():
    scan = synthetic_scan(1, 0, 48, "L")
    gray, colour = InferencePreset(CONFIG).image(scan)
    assert colour == 0.0
    np.testing.assert_array_equal(gray, preprocess_image(scan, CONFIG))


def test_colour_is_measured_before_the_conversion_to_gray():
    # Given a colour photo: its gray model input alone has no colour left to see
    photo = colour_photo()
    gray, colour = InferencePreset(CONFIG).image(photo)
    assert not ood.check(gray[None])[1][0].startswith(ood.REASON_COLOUR)
    # Then the colour measured on the way is what flags it, and an RGB batch gives the same
    assert colour > ood.MAX_COLOUR_FRACTION
    rgb = np.asarray(resize_image(photo, CONFIG))[None]
    assert ood.image_features(rgb)["colour_fraction"][0] == pytest.approx(colour)
    assert ood.REASON_COLOUR in ood.check(rgb)[1][0]


def test_the_training_batch_is_scaled_and_augmented_only_when_asked():
    images = torch.from_numpy(np.stack([preprocess_image(synthetic_scan(0, i, 64), CONFIG)
                                        for i in range(2)]))
    plain = TrainPreset(CONFIG).batch(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, to_model_input(images))
    augmented = TrainPreset(CONFIG, AugmentConfig.preset("paper")).batch(
        images, torch.Generator().manual_seed(0))
    assert augmented.shape == plain.shape and not torch.allclose(augmented, plain)


def test_the_inference_preset_comes_from_the_checkpoint():
    checkpoint = make_checkpoint(build_model("bn_cnn", 4, 48), model_name="bn_cnn",
                                 classes=["a", "b", "c", "d"],
                                 preprocess=PreprocessConfig(image_size=48), config={},
                                 metrics={}, epoch=1, test_time_augmentation="hflip")
    preset = InferencePreset.of(checkpoint)
    assert preset == InferencePreset(PreprocessConfig(image_size=48), "hflip")
    assert InferencePreset.of(checkpoint, tta="none").tta == "none"
    views = preset.views(torch.zeros(2, 48, 48, dtype=torch.uint8))
    assert len(views) == 2 and views[0].shape == (2, 1, 48, 48)
