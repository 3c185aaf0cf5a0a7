"""Tests for brainray.predict: the batch-inference callable, with the checkpoint's TTA, and
several splits predicted in one pass."""

from __future__ import annotations

import numpy as np
import pytest
import ray.data
import torch

from brainray.checkpoint import make_checkpoint, model_from_checkpoint, serialize
from brainray.config import (
    COL_IMAGE,
    COL_LABEL,
    COL_PATH,
    COL_PROBS,
    DEFAULT_CLASSES,
    PreprocessConfig,
    StorageOptions,
)
from brainray.model import build_model
from brainray.predict import Predictor, predict_splits
from brainray.transforms import to_model_input

SIZE = 32


def _write(tmp_path, tta: str) -> tuple[dict, str]:
    torch.manual_seed(0)
    checkpoint = make_checkpoint(build_model("paper_cnn", 4, SIZE), model_name="paper_cnn",
                                 classes=DEFAULT_CLASSES, preprocess=PreprocessConfig(SIZE),
                                 config={}, metrics={}, epoch=1, test_time_augmentation=tta)
    path = tmp_path / f"{tta}.pt"
    path.write_bytes(serialize(checkpoint))
    return checkpoint, str(path)


def _images() -> np.ndarray:
    # left-right asymmetric, so the mirror is a different input
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    images[:, :, : SIZE // 2] //= 4
    return images


def test_hflip_tta_averages_the_logits_of_the_image_and_its_mirror(tmp_path):
    # Given a checkpoint that asks for flip test-time augmentation
    checkpoint, path = _write(tmp_path, "hflip")
    model = model_from_checkpoint(checkpoint)
    x = to_model_input(torch.from_numpy(_images()))
    with torch.no_grad():
        expected = torch.softmax((model(x) + model(x.flip(-1))) / 2, 1).numpy()
        single = torch.softmax(model(x), 1).numpy()
    # When the Predictor scores, Then it averages both views' logits
    got = Predictor(path, StorageOptions()).predict(_images())
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - single).max() > 1e-4


def test_tta_can_be_turned_off_by_the_caller(tmp_path):
    checkpoint, path = _write(tmp_path, "hflip")
    x = to_model_input(torch.from_numpy(_images()))
    with torch.no_grad():
        single = torch.softmax(model_from_checkpoint(checkpoint)(x), 1).numpy()
    got = Predictor(path, StorageOptions(), tta="none").predict(_images())
    np.testing.assert_allclose(got, single, atol=1e-6)


def test_no_tta_checkpoint_runs_one_view(tmp_path):
    _, path = _write(tmp_path, "none")
    predictor = Predictor(path, StorageOptions())
    assert predictor.preset.tta == "none"
    assert predictor.predict(_images()).shape == (3, 4)


def test_unknown_tta_is_refused():
    from brainray.transforms import inference_views

    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        inference_views(torch.zeros(1, 1, 2, 2), "rot90")


@pytest.mark.ray
def test_predict_splits_scores_each_part_in_one_pass_and_keeps_them_apart(ray_cluster, tmp_path):
    # Given two parts that share one file (a held-out test folder may repeat a validation file)
    _, path = _write(tmp_path, "none")
    images = _images()

    def part(names, labels):
        rows = zip(names, labels, strict=True)
        return ray.data.from_items([{COL_PATH: n, COL_IMAGE: images[i], COL_LABEL: label}
                                    for i, (n, label) in enumerate(rows)])

    val = part(["a.png", "b.png"], [0, 1])
    test = part(["b.png", "c.png", "d.png"], [1, 2, 3])
    # When both are predicted in one pass, the test part filtered to three of its paths
    got = predict_splits({"val": (val, None), "test": (test, ["b.png", "c.png", "d.png"])},
                         path, StorageOptions())
    # Then each part has its own rows once, sorted by path, with the model's probabilities
    assert got["val"][COL_PATH].tolist() == ["a.png", "b.png"]
    assert got["test"][COL_PATH].tolist() == ["b.png", "c.png", "d.png"]
    assert got["test"][COL_LABEL].tolist() == [1, 2, 3]
    expected = Predictor(path, StorageOptions()).predict(images)
    np.testing.assert_allclose(np.stack(got["val"][COL_PROBS]), expected[:2], atol=1e-6)
    np.testing.assert_allclose(np.stack(got["test"][COL_PROBS]), expected, atol=1e-6)
