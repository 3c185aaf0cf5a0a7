"""A trivial baseline to beat: 1-nearest-neighbour on 32x32 grayscale thumbnails, and the
near-duplication left across a split, measured on the same thumbnails.

On this dataset such a lookup scores ~97% on the official test split because of near-duplicates;
reporting it beside the model on the same split shows how much the model adds beyond memory.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMBNAIL_SIZE = 32
_CHUNK = 1024  # bounds the distance matrix held at once to _CHUNK x n_train floats


def thumbnail(image: Image.Image) -> np.ndarray:
    """uint8 (32, 32) grayscale thumbnail of a decoded image (any mode)."""
    gray = image.convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


def nearest_neighbour_predict(train_thumbnails: np.ndarray, train_labels: np.ndarray,
                              query_thumbnails: np.ndarray) -> np.ndarray:
    """Label of the closest training thumbnail (Euclidean) for each query thumbnail."""
    if len(train_thumbnails) == 0:
        raise ValueError("the nearest-neighbour baseline needs at least one training image")
    train = train_thumbnails.reshape(len(train_thumbnails), -1).astype(np.float32)
    train_sq = (train**2).sum(1)
    predictions = np.empty(len(query_thumbnails), dtype=np.int64)
    for start in range(0, len(query_thumbnails), _CHUNK):
        query = query_thumbnails[start:start + _CHUNK].reshape(-1, train.shape[1]).astype(
            np.float32)
        # |q - t|^2 = |q|^2 - 2 q.t + |t|^2; |q|^2 is constant per row, so it can be dropped
        distances = train_sq[None, :] - 2.0 * query @ train.T
        predictions[start:start + len(query)] = train_labels[distances.argmin(1)]
    return predictions


def nearest_similarity(train_thumbnails: np.ndarray, query_thumbnails: np.ndarray) -> np.ndarray:
    """Per query, the cosine similarity of its thumbnail to the most similar training thumbnail:
    how close the nearest training image is, 1.0 for a copy."""
    train = train_thumbnails.reshape(len(train_thumbnails), -1).astype(np.float32)
    train /= np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
    best = np.empty(len(query_thumbnails), dtype=np.float32)
    for start in range(0, len(query_thumbnails), _CHUNK):
        query = query_thumbnails[start:start + _CHUNK].reshape(-1, train.shape[1]).astype(
            np.float32)
        query /= np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        best[start:start + len(query)] = (query @ train.T).max(1)
    return np.clip(best, -1.0, 1.0)


SIMILARITY_THRESHOLDS = (0.95, 0.99)


def leakage_summary(similarity: np.ndarray) -> dict:
    """How much near-duplication is left across a split: the distribution of each test image's
    similarity to its nearest training image, and the shares above each threshold."""
    return {
        "method": "cosine similarity of each test image's 32x32 thumbnail to its nearest "
                  "training thumbnail",
        "n_images": int(len(similarity)),
        "median": float(np.median(similarity)) if len(similarity) else None,
        **{f"share_above_{t}": float((similarity > t).mean()) if len(similarity) else None
           for t in SIMILARITY_THRESHOLDS},
    }
