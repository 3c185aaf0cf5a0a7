"""Data wiring: per-row decoding and labelling (pure), split assignment, Ray Data reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainray.config import (
    COL_BYTES,
    COL_ERROR,
    COL_FINGERPRINT,
    COL_GROUP,
    COL_IMAGE,
    COL_LABEL,
    COL_PATH,
    COL_SHA256,
    COL_THUMBNAIL,
    DEFAULT_CLASSES,
    PreprocessConfig,
    StorageOptions,
)
from brainray.data import (
    assign_splits,
    decode_labeled_batch,
    load_labeled,
    materialize_splits,
    sample_data_dir,
)
from tests.conftest import encode, synthetic_scan, tiny_dataset_files, upload_tree, write_tree

CLASSES = list(DEFAULT_CLASSES)


def test_decode_labels_from_class_folders_and_turns_bad_rows_into_errors():
    # Given raw rows as read_binary_files yields them: two good images and three bad rows
    good = encode(synthetic_scan(0, 1))
    batch = {
        COL_PATH: np.array(["root/glioma/a.png", "root/pituitary/b.png", "root/glioma/empty.png",
                            "root/unknown/c.png", "root/loose.png"], dtype=object),
        COL_BYTES: np.array([good, good, b"", good, good], dtype=object),
    }

    # When decoding with an S3 URI prefix
    out = decode_labeled_batch(batch, classes=CLASSES, preprocess=PreprocessConfig(image_size=16),
                               root="root", uri_prefix="s3://")

    # Then good rows get labels, images and hashes; bad rows get a reason and label -1
    assert out[COL_LABEL].tolist() == [0, 3, -1, -1, -1]
    assert out["image"].shape == (5, 16, 16) and out["image"].dtype == np.uint8
    assert out[COL_PATH][0] == "s3://root/glioma/a.png"
    assert out[COL_ERROR][0] == "" and "empty" in out[COL_ERROR][2]
    assert "not one of the classes" in out[COL_ERROR][3]
    assert "class folder" in out[COL_ERROR][4]
    assert out[COL_SHA256][0] == out[COL_SHA256][1]  # same bytes, same content hash
    assert out[COL_FINGERPRINT][0] == out[COL_FINGERPRINT][1] != 0


def _sixteen_bit_png(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels.astype(np.uint16))  # mode I;16
    assert image.mode.startswith("I;16")
    return encode(image)


def test_sixteen_bit_slices_are_fingerprinted_as_the_model_sees_them():
    # Given two different bright 16-bit slices (every value above 255, as CT/MR exports are)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    first = 20_000 + 30_000 * (xx / 64) + rng.integers(0, 50, (64, 64))
    second = 20_000 + 30_000 * (yy / 64) + rng.integers(0, 50, (64, 64))
    batch = {COL_PATH: np.array(["r/glioma/a.png", "r/glioma/b.png"], dtype=object),
             COL_BYTES: np.array([_sixteen_bit_png(first), _sixteen_bit_png(second)],
                                 dtype=object)}
    # When decoded for the split
    out = decode_labeled_batch(batch, classes=CLASSES, preprocess=PreprocessConfig(image_size=32),
                               root="r")
    # Then their fingerprints and thumbnails differ (clipping at 255 made them all alike), and
    # the thumbnail is the stretched 8-bit image the model is trained on
    assert out[COL_ERROR].tolist() == ["", ""]
    assert out[COL_FINGERPRINT][0] != out[COL_FINGERPRINT][1]
    thumbs = out[COL_THUMBNAIL]
    assert thumbs[0].min() < 30 and thumbs[0].max() > 225
    assert not np.array_equal(thumbs[0], thumbs[1])


def _index(labels, shas, fingerprints, prefix="p"):
    return pd.DataFrame({COL_PATH: [f"{prefix}{i:03d}" for i in range(len(labels))],
                         COL_LABEL: labels, COL_SHA256: shas,
                         COL_FINGERPRINT: np.array(fingerprints, dtype=np.uint64),
                         COL_ERROR: [""] * len(labels)})


def test_assign_splits_keeps_duplicates_together_and_skips_error_rows():
    # Given 200 images of 4 classes where every 10th is a byte copy of the one before it
    rng = np.random.default_rng(0)
    n = 200
    labels = np.repeat(np.arange(4), n // 4)
    shas = [f"sha{i - 1 if i % 10 == 9 else i}" for i in range(n)]
    fingerprints = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    index = _index(labels, shas, fingerprints)
    index.loc[5, COL_ERROR] = "empty file (0 bytes)"

    # When assigning splits
    out = assign_splits(index, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, max_hamming=2)

    # Then the error row is left out, each duplicate pair shares a split, all splits exist
    assert len(out) == n - 1 and "p005" not in set(out[COL_PATH])
    by_path = dict(zip(out[COL_PATH], out["split"], strict=True))
    for i in range(9, n, 10):
        assert by_path[f"p{i:03d}"] == by_path[f"p{i - 1:03d}"]
    assert set(out["split"]) == {"train", "val", "test"}


def test_assign_splits_drops_training_images_that_duplicate_the_held_out_test_set():
    # Given training images, one of which is byte-identical to a held-out test image
    train = _index([0, 1, 2, 3] * 5, [f"t{i}" for i in range(20)], list(range(0, 2000, 100)))
    held_out = _index([0], ["t7"], [999_999], prefix="test")

    # When splitting with the held-out set
    out = assign_splits(train, {"train": 0.9, "val": 0.1}, seed=0, max_hamming=0,
                        held_out=held_out)

    # Then the duplicate is marked as dropped and nothing else is
    dropped = out[out["split"] == "dropped_test_overlap"]
    assert dropped[COL_PATH].tolist() == ["p007"]


def test_assign_splits_with_min_similarity_keeps_similar_thumbnails_together():
    # Given 200 unrelated images (distinct hashes and fingerprints) where every 10th has a
    # thumbnail almost equal to the one before it: re-encoded copies the hash missed
    rng = np.random.default_rng(1)
    n = 200
    labels = np.repeat(np.arange(4), n // 4)
    index = _index(labels, [f"sha{i}" for i in range(n)],
                   rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64))
    thumbs = rng.integers(0, 256, (n, 32, 32)).astype(np.uint8)
    for i in range(9, n, 10):
        thumbs[i] = np.clip(thumbs[i - 1].astype(int) + 1, 0, 255)
    index[COL_THUMBNAIL] = list(thumbs)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    # When split with and without the stricter grouping
    strict = assign_splits(index, fractions, seed=3, max_hamming=2, min_similarity=0.99)
    loose = assign_splits(index, fractions, seed=3, max_hamming=2)
    # Then the stricter split keeps every such pair together; the hash alone does not
    pairs = [(f"p{i - 1:03d}", f"p{i:03d}") for i in range(9, n, 10)]
    for split in (strict, loose):
        split.index = split[COL_PATH]
    assert all(strict.loc[a, "split"] == strict.loc[b, "split"] for a, b in pairs)
    assert any(loose.loc[a, "split"] != loose.loc[b, "split"] for a, b in pairs)
    assert strict[COL_GROUP].nunique() == n - len(pairs)


@pytest.mark.ray
def test_load_labeled_reads_a_folder_into_a_sorted_index(ray_cluster, tmp_path):
    # Given a class-folder tree with 5 images per class
    root = write_tree(tmp_path / "data", tiny_dataset_files(per_class=5))

    # When loading it through Ray Data
    labeled = load_labeled(str(root), CLASSES, PreprocessConfig(image_size=24), StorageOptions())

    # Then the index has one row per file, sorted by path, labels from the folders
    index = labeled.index
    assert len(index) == 20 and index[COL_PATH].is_monotonic_increasing
    assert index.groupby(COL_LABEL).size().tolist() == [5, 5, 5, 5]
    assert (index[COL_ERROR] == "").all()
    assert labeled.dataset.count() == 20


@pytest.mark.ray
def test_materialize_splits_holds_each_splits_rows_once_train_shuffled(ray_cluster, tmp_path):
    root = write_tree(tmp_path / "data", tiny_dataset_files(per_class=5))
    labeled = load_labeled(str(root), CLASSES, PreprocessConfig(image_size=24), StorageOptions())
    paths = sorted(labeled.index[COL_PATH])
    by_split = {"train": pd.Series(paths[:14]), "val": pd.Series(paths[14:17]),
                "test": pd.Series(paths[17:]), "empty": pd.Series([], dtype=object)}

    splits = materialize_splits(labeled.dataset, by_split, seed=3)

    assert set(splits) == {"train", "val", "test"}  # an empty split is left out
    for name in ("train", "val", "test"):
        rows = splits[name].to_pandas()
        assert sorted(rows[COL_PATH]) == sorted(by_split[name])
        assert set(rows.columns) == {COL_PATH, COL_IMAGE, COL_LABEL}
    # files are listed class by class; the train split is shuffled once, reproducibly
    train_order = splits["train"].to_pandas()[COL_PATH].tolist()
    assert train_order != sorted(train_order)
    again = materialize_splits(labeled.dataset, {"train": by_split["train"]}, seed=3)
    assert again["train"].to_pandas()[COL_PATH].tolist() == train_order


@pytest.mark.ray
@pytest.mark.s3
def test_load_labeled_reads_a_csv_manifest_on_s3(ray_cluster, s3_bucket, s3_options):
    # Given images under an S3 prefix and a manifest beside them, one row with an unknown label
    client, bucket = s3_bucket
    files = tiny_dataset_files(per_class=2)
    upload_tree(client, bucket, "flat", files)
    rows = [f"{path},{path.split('/')[0]}" for path in files] + ["glioma/img_000.png,cat"]
    client.put_object(Bucket=bucket, Key="flat/manifest.csv",
                      Body=("path,label\n" + "\n".join(rows)).encode())

    # When loading the manifest
    labeled = load_labeled(f"s3://{bucket}/flat/manifest.csv", CLASSES,
                           PreprocessConfig(image_size=24), s3_options)

    # Then labels come from the manifest, paths are full URIs, the bad label is an error row
    index = labeled.index
    assert len(index) == 9
    ok = index[index[COL_ERROR] == ""]
    assert len(ok) == 8 and sorted(ok[COL_LABEL].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(p.startswith(f"s3://{bucket}/flat/") for p in index[COL_PATH])


def test_the_embedded_sample_has_every_class():
    # Given / When the package's sample directory
    from pathlib import Path

    root = Path(sample_data_dir())

    # Then each class folder holds at least 20 JPEGs
    for name in CLASSES:
        assert len(list((root / name).glob("*.jpg"))) >= 20
