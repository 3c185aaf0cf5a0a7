"""The scoring output: its schema and columns, and exactly-once publishing of runs into it.

Layout under the output URI:
  scores/part-<run>-*.parquet    the published dataset (read this folder)
  _staging/<run>/                a run's files while it scores; `_READY` once complete
  _manifest.json                 committed runs and their files: the commit point
  _SUCCESS                       the last committed run, for schedulers that wait on a marker
A run is committed when `_manifest.json` (one atomic object write) names it. A crash before
`_READY` leaves staging that the next run deletes (its inputs are scored again); a crash after it
is rolled forward by the next run (same file names, so nothing is duplicated).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainray import storage
from brainray.config import StorageOptions

STATUS_OK, STATUS_ERROR = "ok", "error"
PROB_PREFIX = "prob_"
# The published columns, in order; documented in the README. Columns are only ever added.
COL_URI, COL_MEMBER, COL_FRAME, COL_SHA256 = "uri", "member", "frame", "content_sha256"
COL_PREDICTED, COL_CONFIDENCE, COL_NEEDS_REVIEW = "predicted_label", "confidence", "needs_review"
COL_MODEL_ID, COL_MODEL_NAME, COL_SCORED_AT = "model_id", "model_name", "scored_at"
COL_STATUS, COL_ERROR = "status", "error"
COL_SOURCE_SIZE, COL_SOURCE_MTIME, COL_RUN_ID = "source_size", "source_mtime_ns", "run_id"
COL_OOD = "out_of_distribution"
# where a DICOM image sits (null for other images), to group slices into series and studies;
# brainray.unpack.DicomTags has one field per column, of the same name
COL_STUDY_UID, COL_SERIES_UID = "study_instance_uid", "series_instance_uid"
COL_SOP_UID, COL_MODALITY = "sop_instance_uid", "modality"
COL_SERIES_DESCRIPTION, COL_INSTANCE_NUMBER = "series_description", "instance_number"
DICOM_COLUMNS = (COL_STUDY_UID, COL_SERIES_UID, COL_SOP_UID, COL_MODALITY,
                 COL_SERIES_DESCRIPTION, COL_INSTANCE_NUMBER)
# What scoring carries per image besides the published columns (brainray.score)
COL_PROBS, COL_OOD_REASON = "probs", "ood_reason"


def output_schema(classes: list[str]) -> pa.Schema:
    """The published schema, with one probability column per class of the model."""
    return pa.schema(
        [pa.field(COL_URI, pa.string(), nullable=False),
         pa.field(COL_MEMBER, pa.string()), pa.field(COL_FRAME, pa.int32()),
         pa.field(COL_SHA256, pa.string()),
         pa.field(COL_PREDICTED, pa.string()), pa.field(COL_CONFIDENCE, pa.float32())]
        + [pa.field(f"{PROB_PREFIX}{name}", pa.float32()) for name in classes]
        + [pa.field(COL_NEEDS_REVIEW, pa.bool_()),
           pa.field(COL_MODEL_ID, pa.string(), nullable=False),
           pa.field(COL_MODEL_NAME, pa.string(), nullable=False),
           pa.field(COL_SCORED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
           pa.field(COL_STATUS, pa.string(), nullable=False), pa.field(COL_ERROR, pa.string()),
           pa.field(COL_SOURCE_SIZE, pa.int64()), pa.field(COL_SOURCE_MTIME, pa.int64()),
           pa.field(COL_RUN_ID, pa.string(), nullable=False),
           # added: not brain MRI by brainray.ood's checks (such rows also get needs_review)
           pa.field(COL_OOD, pa.bool_()),
           # added: the DICOM study/series identity of the image (null for non-DICOM)
           pa.field(COL_STUDY_UID, pa.string()), pa.field(COL_SERIES_UID, pa.string()),
           pa.field(COL_SOP_UID, pa.string()), pa.field(COL_MODALITY, pa.string()),
           pa.field(COL_SERIES_DESCRIPTION, pa.string()),
           pa.field(COL_INSTANCE_NUMBER, pa.int32())])


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and np.isnan(value))


def _arrow_column(values, arrow_type: pa.DataType) -> pa.Array:
    """Typed Arrow column from a batch column. Ray hands all-null columns back as float NaN, so
    missing values are normalised before typing."""
    cast = int if pa.types.is_integer(arrow_type) else None
    cleaned = [None if _is_missing(v) else (cast(v) if cast else v) for v in values]
    return pa.array(cleaned, type=arrow_type)


def _where_ok(values, ok: np.ndarray, convert) -> list:
    return [convert(v) if o else None for v, o in zip(values, ok, strict=True)]


def output_table(batch: dict[str, np.ndarray], *, classes: list[str], model_id: str,
                 model_name: str, run_id: str) -> pa.Table:
    """Scored rows (brainray.score: probabilities, review and OOD flags per image) in the
    published schema: error rows get nulls where there is no prediction."""
    n = len(batch[COL_URI])
    ok = np.array([s == STATUS_OK for s in batch[COL_STATUS]], dtype=bool)
    probs = np.asarray(batch[COL_PROBS], dtype=np.float32).reshape(n, len(classes))
    best = np.nan_to_num(probs, nan=-1.0).argmax(1)
    schema = output_schema(classes)
    columns = {
        **{k: batch[k] for k in (COL_URI, COL_MEMBER, COL_FRAME, COL_SHA256)},
        COL_PREDICTED: _where_ok(best, ok, lambda b: classes[b]),
        COL_CONFIDENCE: _where_ok(np.nan_to_num(probs, nan=0.0).max(1, initial=0.0), ok, float),
        **{f"{PROB_PREFIX}{name}": _where_ok(probs[:, i], ok, float)
           for i, name in enumerate(classes)},
        COL_NEEDS_REVIEW: _where_ok(batch[COL_NEEDS_REVIEW], ok, bool),
        COL_MODEL_ID: [model_id] * n, COL_MODEL_NAME: [model_name] * n,
        COL_SCORED_AT: [dt.datetime.now(dt.UTC)] * n,
        **{k: batch[k] for k in (COL_STATUS, COL_ERROR, COL_SOURCE_SIZE, COL_SOURCE_MTIME)},
        COL_RUN_ID: [run_id] * n,
        COL_OOD: _where_ok(batch[COL_OOD], ok, bool),
        # batches from before the DICOM columns (tests, older callers) have none: nulls
        **{k: batch[k] if k in batch else [None] * n for k in DICOM_COLUMNS},
    }
    return pa.table({k: _arrow_column(v, schema.field(k).type) for k, v in columns.items()},
                     schema=schema)


def summarize(staging: str, options: StorageOptions, threshold: float) -> dict:
    """Counts from a run's staged files (a few small columns; images never come back)."""
    fs, path = storage.resolve(staging, options)
    table = pq.read_table(path, filesystem=fs,
                          columns=[COL_STATUS, COL_PREDICTED, COL_NEEDS_REVIEW, COL_OOD])
    status = Counter(table[COL_STATUS].to_pylist())
    return {"images": table.num_rows, "ok": status.get(STATUS_OK, 0),
            "errors": status.get(STATUS_ERROR, 0),
            "predicted": dict(Counter(p for p in table[COL_PREDICTED].to_pylist() if p)),
            "needs_review": sum(1 for r in table[COL_NEEDS_REVIEW].to_pylist() if r),
            "out_of_distribution": sum(1 for r in table[COL_OOD].to_pylist() if r),
            "confidence_threshold": threshold}


def published_classes(output: str, options: StorageOptions) -> list[str] | None:
    """The classes of the probability columns already published; None before the first run."""
    files = published_files(output, options)
    if not files:
        return None
    fs, path = storage.resolve(files[-1], options)
    names = pq.read_schema(path, filesystem=fs).names
    return [name.removeprefix(PROB_PREFIX) for name in names if name.startswith(PROB_PREFIX)]


SCORES_DIR = "scores"
STAGING_DIR = "_staging"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
READY = "_READY"


def _manifest(output: str, options: StorageOptions) -> dict:
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri, options):
        return {"format": "brainray-scores-v1", "runs": []}
    return storage.read_json(uri, options)


def staging_uri(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def committed_runs(output: str, options: StorageOptions) -> list[dict]:
    """The manifest's committed runs, oldest first: each a run's summary, its run_id, its file
    names under scores/ and committed_at. Empty before the first commit."""
    return _manifest(output, options)["runs"]


def scores_uri(output: str, name: str) -> str:
    return storage.join(output, SCORES_DIR, name)


def published_files(output: str, options: StorageOptions) -> list[str]:
    """URIs of every committed Parquet file, oldest run first."""
    return [scores_uri(output, name) for run in committed_runs(output, options)
            for name in run["files"]]


def read_columns(uri: str, columns: tuple[str, ...], options: StorageOptions) -> pa.Table:
    """Only these columns of one published file; a column the file predates (columns are only
    ever added) comes back as nulls."""
    fs, path = storage.resolve(uri, options)
    try:
        with fs.open_input_file(path) as source:
            parquet = pq.ParquetFile(source)
            present = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[c for c in columns if c in present])
    except OSError as exc:
        raise storage.StorageError(f"cannot read the published file {storage.redact(uri)}: "
                                   f"{exc}") from exc
    for name in columns:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows))
    return table.select(list(columns))


def commit(output: str, run_id: str, options: StorageOptions) -> list[str]:
    """Copy a READY staging dir into scores/ and commit it in the manifest (idempotent).

    The manifest write is the commit point: what fails after it (the _SUCCESS marker, deleting
    the staging folder) does not undo the commit, so it is returned as a warning, and the next
    run's `recover` finishes it.
    """
    staging = staging_uri(output, run_id)
    ready = storage.read_json(storage.join(staging, READY), options)
    names = [f"part-{run_id}-{name}" for name in ready["files"]]
    for source, target in zip(ready["files"], names, strict=True):
        storage.copy_file(storage.join(staging, source),
                          scores_uri(output, target), options)
    manifest = _manifest(output, options)
    if run_id not in {run["run_id"] for run in manifest["runs"]}:
        entry = {**ready, "run_id": run_id, "files": names,
                 "committed_at": dt.datetime.now(dt.UTC).isoformat()}
        manifest["runs"].append(entry)
        storage.write_json(storage.join(output, MANIFEST), manifest, options)
    try:
        storage.write_json(storage.join(output, SUCCESS), {"run_id": run_id}, options)
        storage.delete_dir(staging, options)
    except OSError as exc:  # StorageError included
        return [f"warning: run {run_id} is committed, but cleaning up after it failed ({exc}); "
                "the next run finishes it"]
    return []


def mark_ready(output: str, run_id: str, summary: dict, options: StorageOptions) -> None:
    """Record that the staged files are complete; from here on the run will be committed."""
    staging = staging_uri(output, run_id)
    files = [name for name in storage.list_children(staging, options) if name.endswith(".parquet")]
    storage.write_json(storage.join(staging, READY), {**summary, "files": files}, options)


def recover(output: str, options: StorageOptions) -> list[str]:
    """Finish or discard runs left by crashed jobs. Returns what was done, for the log."""
    done = []
    for run_id in storage.list_children(storage.join(output, STAGING_DIR), options,
                                        folders=True):
        staging = staging_uri(output, run_id)
        if storage.exists(storage.join(staging, READY), options):
            warnings = commit(output, run_id, options)
            done += [f"committed interrupted run {run_id}", *warnings]
        else:
            storage.delete_dir(staging, options)
            done.append(f"discarded incomplete run {run_id}; its images are scored again")
    return done


def scored_keys(output: str, model_id: str, options: StorageOptions) -> set[tuple[str, int, int]]:
    """(uri, size, mtime_ns) of every input already scored by this model in committed runs."""
    keys: set[tuple[str, int, int]] = set()
    for uri in published_files(output, options):
        fs, path = storage.resolve(uri, options)
        table = pq.read_table(path, filesystem=fs,
                              columns=[COL_URI, COL_SOURCE_SIZE, COL_SOURCE_MTIME, COL_MODEL_ID])
        columns = [table[c].to_pylist() for c in table.schema.names]
        keys.update((uri, size, mtime) for uri, size, mtime, row_model in zip(*columns, strict=True)
                    if row_model == model_id)
    return keys
