"""Ray Data wiring: list and read labeled images, decode once, fingerprint, split without leakage.

Images are decoded and preprocessed once into uint8 arrays and materialized in the object store;
only a small metadata index (path, label, hashes, error) ever reaches the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
import ray.data

from brainray import baseline, storage
from brainray import split as splitting
from brainray.config import (
    COL_BYTES,
    COL_ERROR,
    COL_FINGERPRINT,
    COL_GROUP,
    COL_IMAGE,
    COL_LABEL,
    COL_LABEL_NAME,
    COL_PATH,
    COL_SHA256,
    COL_SPLIT,
    COL_THUMBNAIL,
    IMAGE_EXTENSIONS,
    PreprocessConfig,
    StorageOptions,
)
from brainray.transforms import ImageDecodeError, decode_image, preprocess_image, to_8bit

INDEX_COLUMNS = [COL_PATH, COL_LABEL, COL_SHA256, COL_FINGERPRINT, COL_THUMBNAIL, COL_ERROR]
MANIFEST_SUFFIXES = (".csv", ".parquet")


def sample_data_dir() -> str:
    """The small labeled sample shipped inside the package (CC0 images, one folder per class)."""
    return str(resources.files("brainray") / "sample_data")


def _label_from_path(path: str, root: str, classes: list[str]) -> tuple[int, str]:
    relative = path[len(root):].lstrip("/") if path.startswith(root) else path
    parts = relative.split("/")
    if len(parts) < 2:
        return -1, f"not inside a class folder (expected <root>/<class>/<file>): {relative}"
    if parts[0] not in classes:
        return -1, f"folder {parts[0]!r} is not one of the classes {classes}"
    return classes.index(parts[0]), ""


def _label_from_manifest(name: str, classes: list[str]) -> tuple[int, str]:
    if name not in classes:
        return -1, f"manifest label {name!r} is not one of the classes {classes}"
    return classes.index(name), ""


def decode_labeled_batch(batch: dict[str, np.ndarray], *, classes: list[str],
                         preprocess: PreprocessConfig, root: str | None,
                         uri_prefix: str = "") -> dict[str, np.ndarray]:
    """Bytes -> preprocessed image, label, content hash and perceptual fingerprint, per row.

    A row that cannot be decoded keeps its path and gets an `error` and label -1 instead of
    raising, so one bad file never fails the job. `root` is None when labels come from a manifest.
    `uri_prefix` ("s3://" for S3) turns filesystem paths back into the URIs users know.
    """
    n = len(batch[COL_PATH])
    size = preprocess.image_size
    images = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.full(n, -1, dtype=np.int64)
    fingerprints = np.zeros(n, dtype=np.uint64)
    thumbnails = np.zeros((n, baseline.THUMBNAIL_SIZE, baseline.THUMBNAIL_SIZE), dtype=np.uint8)
    sha256s, errors = [], []
    for i in range(n):
        data = batch[COL_BYTES][i]
        sha256s.append(hashlib.sha256(data or b"").hexdigest())
        if root is not None:
            label, error = _label_from_path(str(batch[COL_PATH][i]), root, classes)
        else:
            label, error = _label_from_manifest(str(batch[COL_LABEL_NAME][i]), classes)
        if data is None:
            error = error or MISSING_FILE
        if not error:
            try:
                # Fingerprints and thumbnails see the 8-bit image the model sees: hashing raw
                # 16-bit values clips them, and every bright slice would hash alike.
                image = to_8bit(decode_image(data, preprocess.max_image_pixels))
                images[i] = preprocess_image(image, preprocess)
                fingerprints[i] = splitting.image_fingerprint(image)
                thumbnails[i] = baseline.thumbnail(image)
            except ImageDecodeError as exc:
                error = str(exc)
        labels[i] = label if not error else -1
        errors.append(error)
    paths = np.array([uri_prefix + str(p) for p in batch[COL_PATH]], dtype=object)
    return {COL_PATH: paths, COL_IMAGE: images, COL_LABEL: labels,
            COL_SHA256: np.array(sha256s), COL_FINGERPRINT: fingerprints,
            COL_THUMBNAIL: thumbnails,
            COL_ERROR: np.array(errors, dtype=object)}


def _read_manifest(uri: str, options: StorageOptions) -> ray.data.Dataset:
    """A CSV/Parquet manifest (path,label) -> dataset of path, label name and file bytes.

    Relative paths are resolved against the manifest's own folder.
    """
    fs, path = storage.resolve(uri, options)
    reader = ray.data.read_csv if uri.lower().endswith(".csv") else ray.data.read_parquet
    manifest = reader(path, filesystem=fs)
    missing = {COL_PATH, COL_LABEL} - set(manifest.schema().names)
    if missing:
        raise ValueError(f"manifest {storage.redact(uri)} lacks column(s) {sorted(missing)}; "
                         "it needs path,label")
    base = storage.to_uri(fs, posixpath.dirname(path))
    return manifest.map_batches(_fetch_manifest_rows, batch_format="pandas",
                                fn_kwargs={"base": base, "options": options})


MISSING_FILE = "listed in the manifest, but the file does not exist"


def _read_listed(uri: str, options: StorageOptions) -> bytes | None:
    """The bytes of a file a manifest lists; None when it does not exist (a skipped file with
    that reason). Any other storage failure, after the SDK's retries, fails the job with the URI
    and the cause: an outage must never silently shrink the training set."""
    if not storage.exists(uri, options):
        return None
    return storage.read_bytes(uri, options)


def _fetch_manifest_rows(frame: pd.DataFrame, *, base: str,
                         options: StorageOptions) -> pd.DataFrame:
    paths, payloads = [], []
    for raw_path in frame[COL_PATH].astype(str):
        uri = raw_path if (storage.is_s3(raw_path) or raw_path.startswith("/")) else storage.join(
            base, raw_path)
        paths.append(uri)
        payloads.append(_read_listed(uri, options))
    return pd.DataFrame({COL_PATH: paths, COL_LABEL_NAME: frame[COL_LABEL].astype(str).to_numpy(),
                         COL_BYTES: payloads})


def _image_files(uri: str, options: StorageOptions) -> tuple[pafs.FileSystem, str, list[str]]:
    """The filesystem, root path and paths of every image file under a class-folder tree."""
    fs, root = storage.resolve(uri, options)
    extensions = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
    paths = [e.path for e in storage.list_files(uri, options)
             if e.path.lower().endswith(extensions)]
    if not paths:
        raise ValueError(f"no image files found under {storage.redact(uri)} "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    return fs, root, paths


def read_labeled_images(uri: str, classes: list[str], preprocess: PreprocessConfig,
                        options: StorageOptions) -> ray.data.Dataset:
    """Lazily read a class-folder tree or a manifest into decoded, labeled, fingerprinted rows."""
    storage.ensure_readable_dir(uri, options)
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        raw, root, prefix = _read_manifest(uri, options), None, ""
    else:
        fs, root, paths = _image_files(uri, options)
        prefix = "s3://" if storage.is_s3(uri) else ""
        raw = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    return raw.map_batches(decode_labeled_batch, batch_size=64, fn_kwargs={
        "classes": list(classes), "preprocess": preprocess, "root": root, "uri_prefix": prefix})


@dataclass
class LabeledData:
    """Decoded images in the object store plus the small index the driver splits on."""

    # materialized rows: path, image, label, sha256, fingerprint, error (None once split)
    dataset: ray.data.Dataset | None
    index: pd.DataFrame  # one row per file: path, label, sha256, fingerprint, error


@contextlib.contextmanager
def storage_errors_raised():
    """Within the block, a storage failure in a Ray Data task fails the job with brainray's own
    one-line reason (the URI and the cause), not Ray's "UDF failed to process a data block"."""
    context = ray.data.DataContext.get_current()
    previous = context.raise_original_map_exception
    context.raise_original_map_exception = True  # the UDF's exception, not UserCodeException
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, storage.StorageError):
            raise exc.cause from None
        raise
    finally:
        context.raise_original_map_exception = previous


def load_labeled(uri: str, classes: list[str], preprocess: PreprocessConfig,
                 options: StorageOptions) -> LabeledData:
    with storage_errors_raised():
        dataset = read_labeled_images(uri, classes, preprocess, options).materialize()
    index = dataset.select_columns(INDEX_COLUMNS).to_pandas()
    if index.empty:
        raise ValueError(f"no image files found under {storage.redact(uri)} "
                         f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    index = index.sort_values(COL_PATH, kind="stable").reset_index(drop=True)
    if (index[COL_ERROR] == "").sum() == 0:
        raise ValueError(f"none of the {len(index)} files under {storage.redact(uri)} "
                         f"could be used; first error: {index[COL_ERROR].iloc[0]}")
    return LabeledData(dataset=dataset, index=index)


def assign_splits(index: pd.DataFrame, fractions: dict[str, float], seed: int,
                  max_hamming: int, held_out: pd.DataFrame | None = None,
                  min_similarity: float = 0.0) -> pd.DataFrame:
    """Add `group` and `split` columns to the usable rows of `index` (sorted by path).

    Exact and near-duplicates share a group and so a split; with `min_similarity` > 0, so do
    images whose thumbnails are at least that similar (`split.link_similar`). With `held_out` (a
    user-given test set), training rows that duplicate any held-out image are marked split
    "dropped_test_overlap".
    """
    usable = index[index[COL_ERROR] == ""].reset_index(drop=True)
    frames = [usable] if held_out is None else [
        usable, held_out[held_out[COL_ERROR] == ""].reset_index(drop=True)]
    combined = pd.concat(frames, ignore_index=True)
    groups = splitting.group_duplicates(combined[COL_SHA256].tolist(),
                                        combined[COL_FINGERPRINT].astype(np.uint64).tolist(),
                                        max_hamming)
    if min_similarity > 0:
        groups = splitting.link_similar(groups, np.stack(combined[COL_THUMBNAIL].to_numpy()),
                                        min_similarity)
    usable = usable.assign(**{COL_GROUP: groups[:len(usable)]})
    usable[COL_SPLIT] = splitting.stratified_group_split(
        usable[COL_LABEL].to_numpy(), usable[COL_GROUP].to_numpy(), fractions, seed)
    if held_out is not None:
        overlapping = set(groups[len(usable):].tolist())
        usable.loc[usable[COL_GROUP].isin(overlapping), COL_SPLIT] = "dropped_test_overlap"
    return usable


def _keep_paths(batch: dict[str, np.ndarray], *, paths: frozenset[str],
                columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    names = batch[COL_PATH]
    keep = np.fromiter((p in paths for p in names), dtype=bool, count=len(names))
    return {column: batch[column][keep] for column in columns}


def select_rows(dataset: ray.data.Dataset, paths,
                columns: tuple[str, ...] = (COL_IMAGE, COL_LABEL)) -> ray.data.Dataset:
    """The given columns of the rows whose path is in `paths` (a split, or the usable rows)."""
    return dataset.map_batches(_keep_paths, fn_kwargs={"paths": frozenset(paths),
                                                       "columns": columns})


def take_images(dataset: ray.data.Dataset, paths) -> dict[str, np.ndarray]:
    """The images of a few rows, by path, on the driver (the report's mistakes: keep it short)."""
    rows = select_rows(dataset, paths, columns=(COL_PATH, COL_IMAGE)).take_all()
    return {row[COL_PATH]: row[COL_IMAGE] for row in rows}


SPLIT_COLUMNS = (COL_PATH, COL_IMAGE, COL_LABEL)


def materialize_splits(dataset: ray.data.Dataset, paths: dict[str, pd.Series], seed: int
                       ) -> dict[str, ray.data.Dataset]:
    """Each split's rows (path, image, label) materialized once, so epochs only read blocks.

    Filtering the full dataset every epoch copied every image through a Ray task each time
    (10-20% of a CPU epoch). Once the splits exist the caller can drop the full dataset: the
    object store then holds each usable image once.

    The train split is shuffled globally once (files are listed class by class); each epoch then
    streams its blocks in that order through the workers' seeded local shuffle buffer, which
    draws a different order every epoch. A per-epoch `random_shuffle` moved every image through
    the object store each epoch, and `randomize_block_order` on materialized blocks fails inside
    `streaming_split` in Ray 2.58 (blocks owned by the driver).
    """
    splits = {}
    for name, split_paths in paths.items():
        if len(split_paths):
            rows = select_rows(dataset, split_paths, columns=SPLIT_COLUMNS)
            if name == "train":  # shuffled straight from the filter: no third copy at the peak
                rows = rows.random_shuffle(seed=seed)
            splits[name] = rows.materialize()
    return splits
