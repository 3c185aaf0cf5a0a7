"""The nearest-neighbour thumbnail baseline (pure)."""

import numpy as np
import pytest
from PIL import Image

from brainray.baseline import (
    THUMBNAIL_SIZE,
    leakage_summary,
    nearest_neighbour_predict,
    nearest_similarity,
    thumbnail,
)


def test_thumbnail_is_small_gray_uint8_for_any_mode():
    # Given images of different modes and sizes
    for image in (Image.new("RGB", (300, 200), (10, 200, 30)), Image.new("L", (5, 7), 99)):
        # When thumbnailed / Then the result is 32x32 uint8
        thumb = thumbnail(image)
        assert thumb.shape == (THUMBNAIL_SIZE, THUMBNAIL_SIZE) and thumb.dtype == np.uint8
    assert thumbnail(Image.new("L", (5, 7), 99)).max() == 99


def test_nearest_neighbour_returns_the_label_of_the_closest_training_image():
    # Given three training thumbnails of distinct brightness with labels 0, 1, 2
    train = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 120, 250)])
    labels = np.array([0, 1, 2])
    queries = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 130, 240, 59, 61)])

    # When predicting
    predicted = nearest_neighbour_predict(train, labels, queries)

    # Then each query takes the label of the nearest brightness (59 is nearer 0 than 120)
    assert predicted.tolist() == [0, 1, 2, 0, 1]


def test_nearest_neighbour_chunks_give_the_same_answer_as_one_pass(monkeypatch):
    # Given random thumbnails
    rng = np.random.default_rng(0)
    train, query = rng.integers(0, 256, (50, 8, 8), np.uint8), rng.integers(0, 256, (30, 8, 8),
                                                                              np.uint8)
    labels = rng.integers(0, 4, 50)
    whole = nearest_neighbour_predict(train, labels, query)

    # When the query is processed in chunks of 7
    monkeypatch.setattr("brainray.baseline._CHUNK", 7)

    # Then the predictions are identical
    assert (nearest_neighbour_predict(train, labels, query) == whole).all()


def test_nearest_neighbour_needs_training_images():
    with pytest.raises(ValueError, match="at least one"):
        nearest_neighbour_predict(np.zeros((0, 4, 4), np.uint8), np.zeros(0, int),
                                  np.zeros((1, 4, 4), np.uint8))


def test_nearest_similarity_is_one_for_a_copy_and_lower_for_other_images():
    # Given training thumbnails: a bright left half, a bright right half
    left = np.zeros((4, 4), np.uint8)
    left[:, :2] = 200
    right = left[:, ::-1].copy()
    train = np.stack([left, right])
    # When a copy of each, and an image overlapping both halves equally, are looked up
    queries = np.stack([left, right, np.full((4, 4), 200, np.uint8)])
    similarity = nearest_similarity(train, queries)
    # Then copies are 1.0 and the uniform image is cos 45 degrees from either half
    assert similarity[:2] == pytest.approx([1.0, 1.0])
    assert similarity[2] == pytest.approx(1 / np.sqrt(2), abs=1e-6)


def test_leakage_summary_counts_the_shares_above_each_threshold():
    summary = leakage_summary(np.array([1.0, 0.995, 0.97, 0.5]))
    assert summary["n_images"] == 4
    assert summary["share_above_0.99"] == 0.5
    assert summary["share_above_0.95"] == 0.75
    assert summary["median"] == pytest.approx(0.9825)
