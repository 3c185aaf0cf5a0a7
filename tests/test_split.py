"""Tests for brainray.split: duplicate grouping, group-aware splitting, reporting."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from brainray.split import (
    DEFAULT_MAX_HAMMING,
    MAX_LINKED_GROUP,
    group_duplicates,
    hamming_distance,
    image_fingerprint,
    link_similar,
    similar_pairs,
    split_report,
    stratified_group_split,
)

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _flip_bits(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def _brain_like_image(seed: int, size: int = 224) -> Image.Image:
    """Smooth, high-contrast synthetic image: ellipses on a dark background."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 10, size - 20, size - 10), fill=90)
    for _ in range(6):
        x, y = rng.integers(30, size - 80, size=2)
        w, h = rng.integers(20, 60, size=2)
        draw.ellipse((x, y, x + w, y + h), fill=int(rng.integers(150, 256)))
    return image


def _reencode_jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    reloaded = Image.open(buffer)
    reloaded.load()
    return reloaded


# --- image_fingerprint -------------------------------------------------------


def test_fingerprint_is_a_64_bit_non_negative_int_and_leaves_image_untouched():
    # Given an RGB image
    image = _brain_like_image(0).convert("RGB")
    before = image.tobytes()

    # When it is fingerprinted
    fingerprint = image_fingerprint(image)

    # Then the result is a 64-bit unsigned int and the image is unchanged
    assert isinstance(fingerprint, int)
    assert 0 <= fingerprint < 2**64
    assert image.mode == "RGB" and image.size == (224, 224)
    assert image.tobytes() == before


def test_fingerprint_survives_reencoding_and_resizing_within_default_distance():
    # Given an image and slightly degraded copies of it
    original = _brain_like_image(1)
    copies = [
        _reencode_jpeg(original, quality=70),
        original.resize((200, 200)),
        original.resize((160, 160)).resize((224, 224)),
        original.convert("RGB"),
    ]

    # When all are fingerprinted
    reference = image_fingerprint(original)
    distances = [hamming_distance(reference, image_fingerprint(c)) for c in copies]

    # Then every copy is a near-duplicate at the default threshold
    assert max(distances) <= DEFAULT_MAX_HAMMING, distances


def test_fingerprints_of_very_different_images_are_far_apart():
    # Given two unrelated images
    first, second = _brain_like_image(2), _brain_like_image(3)

    # When fingerprinted
    distance = hamming_distance(image_fingerprint(first), image_fingerprint(second))

    # Then they are far beyond the default threshold
    assert distance > 4 * DEFAULT_MAX_HAMMING


def test_mirror_image_gradients_give_opposite_fingerprints():
    # Given a left-to-right ramp and its mirror
    ramp = Image.fromarray(np.tile(np.arange(0, 252, 28, dtype=np.uint8), (8, 1)))
    mirrored = ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # When fingerprinted
    a, b = image_fingerprint(ramp), image_fingerprint(mirrored)

    # Then every difference bit flips: all ones versus all zeros
    assert a == 2**64 - 1
    assert b == 0
    assert hamming_distance(a, b) == 64


# --- group_duplicates --------------------------------------------------------


def test_identical_content_hash_groups_items_with_unrelated_fingerprints():
    # Given two byte-identical files whose fingerprints happen to be far apart
    hashes = ["aa", "bb", "aa"]
    fingerprints = [0, 2**64 - 1, 2**40 - 1]

    # When grouped with exact fingerprint matching only
    groups = group_duplicates(hashes, fingerprints, max_distance=0)

    # Then the equal content hashes share a group and the other item is alone
    assert groups.tolist() == [0, 1, 0]


def test_fingerprints_within_distance_group_and_beyond_do_not():
    # Given fingerprints at distance 2 and 3 from a base value
    base = 0x0123456789ABCDEF
    near = _flip_bits(base, 0, 63)
    far = _flip_bits(base, 5, 20, 40)
    hashes = ["a", "b", "c"]

    # When grouped with max_distance 2
    groups = group_duplicates(hashes, [base, near, far], max_distance=2)

    # Then only the distance-2 pair is joined
    assert groups.tolist() == [0, 0, 1]


def test_max_distance_zero_means_exact_fingerprint_equality():
    # Given equal fingerprints and one differing by a single bit
    fingerprints = [7, 7, 6]

    # When grouped at distance 0
    groups = group_duplicates(["a", "b", "c"], fingerprints, max_distance=0)

    # Then only the equal pair is grouped
    assert groups.tolist() == [0, 0, 1]


def test_grouping_is_transitive():
    # Given a ~ b and b ~ c, but a and c 4 bits apart
    a = 0
    b = _flip_bits(a, 1, 2)
    c = _flip_bits(b, 30, 50)
    assert hamming_distance(a, c) == 4

    # When grouped at distance 2
    groups = group_duplicates(["x", "y", "z", "w"], [a, b, c, 2**64 - 1], max_distance=2)

    # Then a, b and c form one group
    assert groups.tolist() == [0, 0, 0, 1]


def test_transitivity_mixes_content_hashes_and_fingerprints():
    # Given item 0 ~ item 1 by fingerprint and item 1 == item 2 by content hash
    fingerprints = [0, 1, 2**64 - 1]
    hashes = ["p", "q", "q"]

    # When grouped
    groups = group_duplicates(hashes, fingerprints, max_distance=1)

    # Then all three are one group
    assert groups.tolist() == [0, 0, 0]


def test_group_ids_are_numbered_by_first_member_and_deterministic():
    # Given items where the first group seen is not the smallest fingerprint
    fingerprints = [2**63 + 5, 3, 2**63 + 5, 1000, 3]
    hashes = list("abcde")

    # When grouped twice
    first = group_duplicates(hashes, fingerprints, max_distance=0)
    second = group_duplicates(hashes, np.array(fingerprints, dtype=np.uint64), 0)

    # Then ids are 0..G-1 in order of first appearance, int64, identical across calls
    assert first.dtype == np.int64
    assert first.tolist() == [0, 1, 0, 2, 1]
    assert np.array_equal(first, second)


def test_banded_search_matches_brute_force_on_random_fingerprints():
    # Given random fingerprints with planted near-duplicates
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    noise = np.uint64(1) << rng.integers(0, 64, size=300).astype(np.uint64)
    fingerprints = np.concatenate([base, base ^ noise, base[:50] ^ np.uint64(0b1011)])
    hashes = [str(i) for i in range(fingerprints.size)]

    for max_distance in (0, 1, 3, 7):
        # When grouped with the banded search
        groups = group_duplicates(hashes, fingerprints, max_distance)

        # Then pairwise membership equals brute-force connected components
        dist = np.bitwise_count(fingerprints[:, None] ^ fingerprints[None, :])
        adjacency = dist <= max_distance
        reach = adjacency.copy()
        for _ in range(fingerprints.size):
            grown = (reach.astype(np.float32) @ adjacency.astype(np.float32)) > 0
            if np.array_equal(grown, reach):
                break
            reach = grown
        assert np.array_equal(groups[:, None] == groups[None, :], reach), max_distance


def test_group_duplicates_rejects_bad_input():
    # Given mismatched lengths, a negative distance and a negative fingerprint
    # When grouped / Then a ValueError is raised
    with pytest.raises(ValueError):
        group_duplicates(["a"], [1, 2], 0)
    with pytest.raises(ValueError):
        group_duplicates(["a"], [1], -1)
    with pytest.raises(ValueError):
        group_duplicates(["a"], [-1], 0)


# --- stricter grouping: similar thumbnails ------------------------------------


def _thumbnails(n: int, seed: int = 0) -> np.ndarray:
    """n unrelated random 8x8 thumbnails (pairwise cosine well below 0.99)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8)).astype(np.uint8)


def test_similar_pairs_links_a_near_copy_and_nothing_else():
    # Given unrelated thumbnails and one near-copy of the first (brightness off by a little)
    thumbs = _thumbnails(6)
    thumbs[5] = np.clip(thumbs[0].astype(int) + 2, 0, 255)
    # When pairs at cosine >= 0.99 are found
    i, j, sim = similar_pairs(thumbs, 0.99)
    # Then only (0, 5) is linked
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 5)]
    assert sim[0] >= 0.99


def test_similar_pairs_needs_mutual_neighbours():
    # Given one image with more near-copies than it has neighbour slots (3), plus noise
    base = _thumbnails(1)[0].astype(int)
    thumbs = np.stack([np.clip(base + d, 0, 255) for d in (0, 1, 2, 3, 4)]).astype(np.uint8)
    i, j, _ = similar_pairs(thumbs, 0.9, neighbours=1)
    # Then with one neighbour each, only mutual nearest pairs remain, never all ten pairs
    assert 0 < len(i) < 10
    assert all(a < b for a, b in zip(i, j, strict=True))


def test_link_similar_merges_groups_of_similar_images():
    thumbs = _thumbnails(6)
    thumbs[5] = thumbs[0]
    groups = link_similar(np.arange(6), thumbs, 0.99)
    assert groups[0] == groups[5]
    assert len(set(groups.tolist())) == 5


def test_link_similar_never_grows_a_group_past_the_cap():
    # Given a chain of slowly drifting thumbnails, each a near-copy of the next
    base = _thumbnails(1)[0].astype(float)
    steps = [np.clip(base + 0.5 * k, 0, 255) for k in range(MAX_LINKED_GROUP + 30)]
    thumbs = np.stack(steps).astype(np.uint8)
    # When linked at a threshold every neighbour passes
    groups = link_similar(np.arange(len(thumbs)), thumbs, 0.9)
    # Then no group is larger than the cap, so a chain cannot swallow the dataset
    assert np.bincount(groups).max() <= MAX_LINKED_GROUP
    assert np.bincount(groups).max() > 1


def test_link_similar_keeps_existing_groups():
    thumbs = _thumbnails(4)
    groups = link_similar(np.array([0, 0, 1, 2]), thumbs, 0.999)
    assert groups.tolist() == [0, 0, 1, 2]


# --- stratified_group_split --------------------------------------------------


def _synthetic_dataset(n: int = 1000, seed: int = 0):
    """Labels in 4 classes; groups of size 1-4 sharing a label (a few conflicts)."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 3, 4], size=n)
    groups = np.repeat(np.arange(n), sizes)[:n]
    group_labels = rng.integers(0, 4, size=n)
    labels = group_labels[groups]
    labels[::97] = (labels[::97] + 1) % 4
    return labels, groups


def test_every_group_lands_in_exactly_one_split():
    # Given a grouped synthetic dataset
    labels, groups = _synthetic_dataset()

    # When split
    splits = stratified_group_split(labels, groups, FRACTIONS, seed=0)

    # Then each group maps to a single split name from the fractions
    assert splits.shape == labels.shape
    assert set(splits.tolist()) == set(FRACTIONS)
    for g in np.unique(groups):
        assert len(set(splits[groups == g].tolist())) == 1


def test_split_is_deterministic_for_a_seed_and_changes_with_the_seed():
    # Given the same inputs
    labels, groups = _synthetic_dataset()

    # When split twice with one seed and once with another
    a = stratified_group_split(labels, groups, FRACTIONS, seed=7)
    b = stratified_group_split(labels, groups, FRACTIONS, seed=7)
    c = stratified_group_split(labels, groups, FRACTIONS, seed=8)

    # Then equal seeds agree exactly and a different seed assigns differently
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_per_class_proportions_are_close_to_fractions():
    # Given 1,000 items in 4 classes with small duplicate groups
    labels, groups = _synthetic_dataset(1000)

    # When split 80/10/10
    splits = stratified_group_split(labels, groups, FRACTIONS, seed=0)

    # Then each class is within 3 percentage points of each fraction
    for cls in np.unique(labels):
        in_class = splits[labels == cls]
        for name, fraction in FRACTIONS.items():
            share = np.mean(in_class == name)
            assert abs(share - fraction) < 0.03, (cls, name, share)


def test_tied_group_counts_toward_the_smallest_label():
    # Given a 2-image group T labelled {0, 1}, a class-0 singleton S and two
    # class-1 singletons, split 50/50. If T counts as class 0, class 0 has two
    # groups and they must go to different splits; if it counted as class 1,
    # some seeds would visit T first and put it in "train" beside S.
    labels = [0, 1, 0, 1, 1]
    groups = [0, 0, 1, 2, 3]
    tied, single = 0, 2

    for seed in range(12):
        # When split
        splits = stratified_group_split(labels, groups, {"train": 0.5, "test": 0.5}, seed)

        # Then T and S always land in different splits
        assert splits[tied] != splits[single], seed


def test_group_takes_its_majority_label():
    # Given a group of three (labels 1, 1, 0) and a lone class-0 image, split 50/50
    labels = [1, 1, 0, 0]
    groups = [0, 0, 0, 1]

    for seed in range(5):
        # When split
        splits = stratified_group_split(labels, groups, {"train": 0.5, "test": 0.5}, seed)

        # Then each is the only group of its class and goes to the first split
        assert splits.tolist() == ["train"] * 4


def test_each_split_gets_a_group_per_class_even_with_one_large_group():
    # Given a class of 3 groups where a huge one would exhaust every deficit
    labels = np.zeros(102, dtype=int)
    groups = np.array([0] * 100 + [1, 2])

    for seed in range(10):
        # When split 80/10/10
        splits = stratified_group_split(labels, groups, FRACTIONS, seed=seed)

        # Then train, val and test each receive one group
        assert set(splits.tolist()) == set(FRACTIONS)


def test_ties_in_deficit_follow_fraction_order():
    # Given one class with two single-image groups split 50/50
    labels = [0, 0]
    groups = [0, 1]

    # When split with "b" listed before "a"
    splits = stratified_group_split(labels, groups, {"b": 0.5, "a": 0.5}, seed=0)

    # Then the first visited group fills "b" and the second "a"
    assert sorted(splits.tolist()) == ["a", "b"]
    rng_order = np.random.default_rng(0).permutation(2)
    assert splits[rng_order[0]] == "b"


@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.8, "val": 0.1},
        {"train": 0.9, "val": 0.2, "test": -0.1},
        {"train": 1.0, "val": 0.0},
        {},
    ],
)
def test_invalid_fractions_are_rejected(fractions):
    # Given fractions that are non-positive or do not sum to 1
    # When splitting / Then a ValueError names the problem
    with pytest.raises(ValueError, match="fractions"):
        stratified_group_split([0, 1], [0, 1], fractions, seed=0)


def test_fractions_within_tolerance_are_accepted():
    # Given fractions summing to 1 up to float error
    fractions = {"train": 0.7, "val": 0.2, "test": 0.1 + 5e-7}

    # When splitting
    splits = stratified_group_split([0, 0, 0], [0, 1, 2], fractions, seed=0)

    # Then it succeeds with one item per split
    assert sorted(splits.tolist()) == ["test", "train", "val"]


# --- split_report ------------------------------------------------------------


def test_split_report_counts_on_a_hand_built_example():
    # Given 7 images: a 3-member group with conflicting labels, a 2-member group
    # and two singletons, split by hand
    class_names = ["glioma", "notumor"]
    labels = [0, 0, 1, 1, 1, 0, 1]
    groups = [0, 0, 0, 1, 1, 2, 3]
    splits = ["train", "train", "train", "val", "val", "train", "test"]

    # When reported
    report = split_report(labels, groups, splits, class_names)

    # Then the counts match and the result is JSON-serialisable
    assert report["n_images"] == 7
    assert report["n_groups"] == 4
    assert report["n_duplicate_groups"] == 2
    assert report["n_images_in_duplicate_groups"] == 5
    assert report["largest_group_size"] == 3
    assert report["n_label_conflict_groups"] == 1
    assert report["label_conflict_examples"] == [
        {"group": 0, "members": [0, 1, 2], "labels": ["glioma", "glioma", "notumor"]}
    ]
    assert report["n_groups_spanning_splits"] == 0
    assert report["counts"] == {
        "train": {"glioma": 3, "notumor": 1},
        "val": {"glioma": 0, "notumor": 2},
        "test": {"glioma": 0, "notumor": 1},
    }
    assert report["split_sizes"] == {"train": 4, "val": 2, "test": 1}
    assert json.loads(json.dumps(report)) == report


def test_split_report_flags_groups_spanning_splits_and_caps_examples():
    # Given 25 two-member conflict groups whose members sit in different splits
    labels = np.tile([0, 1], 25)
    groups = np.repeat(np.arange(25), 2)
    splits = np.tile(["train", "test"], 25)

    # When reported
    report = split_report(labels, groups, splits, ["a", "b"])

    # Then every group counts as leaking and examples stop at 20
    assert report["n_label_conflict_groups"] == 25
    assert len(report["label_conflict_examples"]) == 20
    assert report["n_groups_spanning_splits"] == 25


def test_pipeline_end_to_end_on_synthetic_images():
    # Given synthetic images with an exact copy and a re-encoded near-copy
    originals = [_brain_like_image(seed) for seed in range(10, 16)]
    images = originals + [originals[0].copy(), _reencode_jpeg(originals[1], 80)]
    labels = [0, 1, 0, 1, 0, 1, 0, 1]
    hashes = [hashlib.sha256(img.tobytes()).hexdigest() for img in images]

    # When fingerprinted, grouped, split and reported
    fingerprints = [image_fingerprint(img) for img in images]
    groups = group_duplicates(hashes, fingerprints, DEFAULT_MAX_HAMMING)
    splits = stratified_group_split(labels, groups, FRACTIONS, seed=0)
    report = split_report(labels, groups, splits, ["x", "y"])

    # Then copies share their original's group and split, and nothing leaks
    assert groups[6] == groups[0] and groups[7] == groups[1]
    assert splits[6] == splits[0] and splits[7] == splits[1]
    assert report["n_duplicate_groups"] == 2
    assert report["n_groups_spanning_splits"] == 0
