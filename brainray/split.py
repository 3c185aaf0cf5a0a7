"""Leakage-safe dataset splitting: group exact and near-duplicate images, then
assign whole groups to train/val/test with per-class proportions kept close."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import imagehash
import numpy as np
from PIL import Image

# Measured on the Brain Tumor MRI Training folder (5,708 images, 8x8 dhash): at
# distance <= 2 groups are the same slice re-encoded, shifted or intensity-augmented
# (largest group 44, one slice); at 3, unrelated glioma/meningioma slices already
# chain into a 128-image group, because 8x8 dhash of axial MRI is dominated by the
# skull outline.
DEFAULT_MAX_HAMMING = 2

FINGERPRINT_BITS = 64


def image_fingerprint(image: Image.Image) -> int:
    """64-bit difference hash of ``image`` as a non-negative int (MSB = first bit).

    imagehash converts/resizes into new images, so ``image`` is left untouched.
    """
    bits = imagehash.dhash(image, hash_size=8).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two fingerprints."""
    return (int(a) ^ int(b)).bit_count()


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            # Path halving keeps trees shallow without recursion.
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            # Attaching the larger root under the smaller is arbitrary but cheap;
            # final ids are renumbered by first member anyway.
            if ri < rj:
                self.parent[rj] = ri
            else:
                self.parent[ri] = rj


def _as_fingerprints(fingerprints: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(fingerprints, np.ndarray):
        if fingerprints.ndim != 1:
            raise ValueError("fingerprints must be one-dimensional")
        if fingerprints.dtype == np.uint64:
            return fingerprints
        if fingerprints.dtype.kind in "iu":
            if fingerprints.size and fingerprints.min() < 0:
                raise ValueError("fingerprints must be non-negative")
            return fingerprints.astype(np.uint64)
        fingerprints = fingerprints.tolist()
    # Converted one by one: np.asarray would turn a list mixing small ints and
    # ints >= 2**63 into float64 and silently lose low bits.
    out = np.empty(len(fingerprints), dtype=np.uint64)
    for i, value in enumerate(fingerprints):
        value = int(value)
        if not 0 <= value < 2**FINGERPRINT_BITS:
            raise ValueError(f"fingerprint {value} is not a 64-bit unsigned value")
        out[i] = value
    return out


def _band_masks(n_bands: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) per band, splitting 64 bits into ``n_bands`` near-equal widths."""
    widths = [FINGERPRINT_BITS // n_bands] * n_bands
    for k in range(FINGERPRINT_BITS % n_bands):
        widths[k] += 1
    bands, shift = [], 0
    for w in widths:
        bands.append((shift, np.uint64((1 << w) - 1)))
        shift += w
    return bands


def _near_pairs(fps: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j in ``fps``) with Hamming distance <= max_distance.

    Pigeonhole: split into max_distance+1 bands; any two hashes within
    max_distance bits agree exactly on at least one band, so only hashes sharing
    a band value need comparing.
    """
    n = fps.shape[0]
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    for shift, mask in _band_masks(max_distance + 1):
        band = (fps >> np.uint64(shift)) & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        # Compare each element with the one `offset` places later in the sorted
        # order; every pair inside a bucket is reached at some offset, and the
        # loop length is the largest bucket size, not n.
        offset = 1
        while offset < n:
            same = sorted_band[:-offset] == sorted_band[offset:]
            if not same.any():
                break
            a = order[:-offset][same]
            b = order[offset:][same]
            close = np.bitwise_count(fps[a] ^ fps[b]) <= max_distance
            found_i.append(np.minimum(a[close], b[close]))
            found_j.append(np.maximum(a[close], b[close]))
            offset += 1
    if not found_i:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty
    return np.concatenate(found_i), np.concatenate(found_j)


def _renumber_by_first_member(roots: np.ndarray) -> np.ndarray:
    _, first_index, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(first_index.shape[0], dtype=np.int64)
    rank[np.argsort(first_index, kind="stable")] = np.arange(first_index.shape[0])
    return rank[inverse.ravel()]


def group_duplicates(
    content_hashes: Sequence[Hashable],
    fingerprints: Sequence[int] | np.ndarray,
    max_distance: int = DEFAULT_MAX_HAMMING,
) -> np.ndarray:
    """Group ids (int64, one per item) joining equal content hashes and
    fingerprints within ``max_distance`` bits, transitively.

    Groups are numbered 0..G-1 in order of their lowest-index member, so the
    result depends only on the item order the caller chose.
    """
    fps = _as_fingerprints(fingerprints)
    n = fps.shape[0]
    if len(content_hashes) != n:
        raise ValueError(f"{len(content_hashes)} content hashes but {n} fingerprints")
    max_distance = int(max_distance)
    if max_distance < 0:
        raise ValueError("max_distance must be >= 0")
    if n == 0:
        return np.empty(0, dtype=np.int64)

    uf = _UnionFind(n)
    first_with_hash: dict[Hashable, int] = {}
    for i, h in enumerate(content_hashes):
        uf.union(first_with_hash.setdefault(h, i), i)

    # Collapse identical fingerprints first: exact copies are common in scraped data and
    # would otherwise inflate every band bucket.
    unique_fps, first_index, inverse = np.unique(fps, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    for i, rep in enumerate(first_index[inverse].tolist()):
        uf.union(rep, i)

    if max_distance >= FINGERPRINT_BITS:
        # Every pair is within distance; banding would have empty bands.
        for i in range(1, n):
            uf.union(0, i)
    elif max_distance > 0 and unique_fps.shape[0] > 1:
        pi, pj = _near_pairs(unique_fps, max_distance)
        for a, b in zip(first_index[pi].tolist(), first_index[pj].tolist(), strict=True):
            uf.union(a, b)

    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    return _renumber_by_first_member(roots)


# The stricter grouping's guard against chaining: only mutual nearest neighbours are linked
# (each among the other's SIMILAR_NEIGHBOURS most similar images), strongest links first, and no
# link may grow a group past MAX_LINKED_GROUP images (the perceptual hash's largest group on the
# shared data is 44: one slice re-encoded many times).
SIMILAR_NEIGHBOURS = 3
MAX_LINKED_GROUP = 50
_SIM_CHUNK = 1024


def similar_pairs(thumbnails: np.ndarray, min_similarity: float,
                  neighbours: int = SIMILAR_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """(i, j, similarity) of mutual nearest neighbours whose thumbnails' cosine similarity is at
    least `min_similarity`, i < j, strongest first."""
    n = len(thumbnails)
    k = min(neighbours, n - 1)
    if k < 1:
        empty = np.empty(0, dtype=np.intp)
        return empty, empty, np.empty(0, dtype=np.float32)
    x = thumbnails.reshape(n, -1).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    top = np.empty((n, k), dtype=np.intp)
    top_sim = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, _SIM_CHUNK):
        sims = x[start:start + _SIM_CHUNK] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf  # not its own neighbour
        top[start:start + len(sims)] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sim[start:start + len(sims)] = np.take_along_axis(sims, top[start:start + len(sims)],
                                                              axis=1)
    neighbour_sets = [set(row) for row in top.tolist()]
    i = np.repeat(np.arange(n), k)
    j, sim = top.ravel(), top_sim.ravel()
    keep = (sim >= min_similarity) & (i < j)
    keep &= np.fromiter((a in neighbour_sets[b] for a, b in zip(i, j, strict=True)), bool,
                        count=len(i))
    order = np.argsort(-sim[keep], kind="stable")
    return i[keep][order], j[keep][order], sim[keep][order]


def link_similar(groups: np.ndarray, thumbnails: np.ndarray, min_similarity: float,
                 max_group_size: int = MAX_LINKED_GROUP) -> np.ndarray:
    """`groups` with the groups of similar images (`similar_pairs`) merged, never past
    `max_group_size` images per merge; renumbered by first member like `group_duplicates`."""
    groups = np.asarray(groups)
    uf = _UnionFind(len(groups))
    first_of_group: dict[int, int] = {}
    for index, group in enumerate(groups.tolist()):
        uf.union(first_of_group.setdefault(group, index), index)
    size = np.zeros(len(groups), dtype=np.int64)
    np.add.at(size, [uf.find(index) for index in range(len(groups))], 1)
    for a, b in zip(*similar_pairs(thumbnails, min_similarity)[:2], strict=True):
        ra, rb = uf.find(int(a)), uf.find(int(b))
        if ra != rb and size[ra] + size[rb] <= max_group_size:
            uf.union(ra, rb)
            size[uf.find(ra)] = size[ra] + size[rb]
    roots = np.fromiter((uf.find(i) for i in range(len(groups))), dtype=np.int64,
                        count=len(groups))
    return _renumber_by_first_member(roots)


def _validate_fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(fractions)
    if not names:
        raise ValueError("fractions must name at least one split")
    values = np.array([float(fractions[name]) for name in names], dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"fractions must all be positive, got {dict(fractions)}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {values.sum():.8g}")
    return names, values


def _assign_class_groups(sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Split index per group of one class, in the given order: each goes to the split with the
    largest image deficit against ``fraction * class total`` (ties -> order of fractions)."""
    deficit = fractions * sizes.sum()
    groups_in_split = np.zeros(len(fractions), dtype=np.int64)
    chosen = np.empty(len(sizes), dtype=np.int64)
    for k, size in enumerate(sizes):
        empty = np.flatnonzero(groups_in_split == 0)
        if 0 < empty.size and len(sizes) - k <= empty.size:
            # Reserve the last groups for splits still empty in this class,
            # so a large group cannot leave val or test without the class.
            choice = int(empty[np.argmax(deficit[empty])])
        else:
            choice = int(np.argmax(deficit))
        chosen[k] = choice
        groups_in_split[choice] += 1
        deficit[choice] -= size
    return chosen


def stratified_group_split(
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    fractions: Mapping[str, float],
    seed: int,
) -> np.ndarray:
    """Split name per item (object array); whole groups go to one split.

    Each group takes its majority label (ties -> smallest label). Per class, in
    ascending label order, the class's groups are visited in a seeded random
    order and each goes to the split with the largest image deficit against
    ``fraction * class total`` (ties -> order of ``fractions``).
    """
    names, values = _validate_fractions(fractions)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.ndim != 1 or groups.ndim != 1 or labels.shape != groups.shape:
        raise ValueError("labels and groups must be 1-D and of equal length")
    if labels.size == 0:
        return np.empty(0, dtype=object)

    _, label_code = np.unique(labels, return_inverse=True)
    label_code = label_code.ravel()
    _, group_code = np.unique(groups, return_inverse=True)
    group_code = group_code.ravel()
    n_groups = int(group_code.max()) + 1
    n_labels = int(label_code.max()) + 1

    votes = np.zeros((n_groups, n_labels), dtype=np.int64)
    np.add.at(votes, (group_code, label_code), 1)
    # argmax returns the first maximum, i.e. the smallest label on a tie.
    group_label = votes.argmax(axis=1)
    group_size = votes.sum(axis=1)

    rng = np.random.default_rng(seed)
    group_split = np.empty(n_groups, dtype=np.int64)
    for cls in range(n_labels):
        class_groups = np.flatnonzero(group_label == cls)
        if class_groups.size:
            class_groups = class_groups[rng.permutation(class_groups.size)]
            group_split[class_groups] = _assign_class_groups(group_size[class_groups], values)

    return np.array(names, dtype=object)[group_split[group_code]]


def _group_findings(group_ids: np.ndarray, group_code: np.ndarray, labels: np.ndarray,
                    splits: np.ndarray, class_names: list[str]) -> tuple[int, int, list[dict]]:
    """Groups spanning splits, groups with conflicting labels, and up to 20 of the latter."""
    members_by_group: list[list[int]] = [[] for _ in group_ids]
    for i, g in enumerate(group_code.tolist()):
        members_by_group[g].append(i)
    conflict_examples, n_conflicts, n_spanning = [], 0, 0
    for g, members in enumerate(members_by_group):
        if len({splits[i] for i in members}) > 1:
            n_spanning += 1
        member_labels = labels[members]
        if np.unique(member_labels).size > 1:
            n_conflicts += 1
            if len(conflict_examples) < 20:
                conflict_examples.append({
                    "group": group_ids[g].item(), "members": members[:20],
                    "labels": [class_names[int(x)] for x in member_labels[:20]]})
    return n_spanning, n_conflicts, conflict_examples


def split_report(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    splits: Sequence[str] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """JSON-serialisable summary of duplicate groups and per-split class counts.

    ``labels`` are integer indices into ``class_names``.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    splits = np.asarray(splits, dtype=object)
    if not (labels.shape == groups.shape == splits.shape) or labels.ndim != 1:
        raise ValueError("labels, groups and splits must be 1-D and of equal length")
    class_names = [str(name) for name in class_names]
    if labels.size and (
        labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(class_names)
    ):
        raise ValueError("labels must be integer indices into class_names")

    group_ids, group_code, group_size = np.unique(groups, return_inverse=True, return_counts=True)
    n_spanning, n_conflicts, conflict_examples = _group_findings(
        group_ids, group_code.ravel(), labels, splits, class_names)

    split_names = list(dict.fromkeys(splits.tolist()))
    counts = {str(s): {name: 0 for name in class_names} for s in split_names}
    for s, label in zip(splits.tolist(), labels.tolist(), strict=True):
        counts[str(s)][class_names[label]] += 1
    duplicate = group_size > 1

    return {
        "n_images": int(labels.size),
        "n_groups": int(group_ids.size),
        "n_duplicate_groups": int(duplicate.sum()),
        "n_images_in_duplicate_groups": int(group_size[duplicate].sum()),
        "largest_group_size": int(group_size.max()) if group_size.size else 0,
        "n_label_conflict_groups": n_conflicts,
        "label_conflict_examples": conflict_examples,
        "n_groups_spanning_splits": n_spanning,
        "split_sizes": {s: sum(c.values()) for s, c in counts.items()},
        "counts": counts,
    }
