"""The scoring output: its schema and columns, and exactly-once publishing of runs into it.

Layout under the output URI:
  scores/part-<run>-*.parquet    the published dataset (read this folder)
  _manifest.json                 committed runs, their files and the current index: the commit point
  _index/keys-<run>.parquet      what the output has scored (brainray.scored_index)
  _staging/<run>/                a run's files while it scores; `_READY` once complete
  _lease.json                    the run that holds the output (brainray.lease)
  _SUCCESS                       the last committed run, for schedulers that wait on a marker
A run's files reach scores/ under hidden pending names first; the run is committed when
`_manifest.json` names it (a conditional write: only if unchanged since read), and only then are
its files renamed to their final names. `recover` finishes or discards, at every step, what a
crashed run left. `_step` names each storage operation, so a test can SIGKILL the process just
before it (BRAINRAY_TEST_KILL_BEFORE).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from brainray import scored_index, storage
from brainray.config import StorageOptions

# The published schema's version, in every file's metadata and in the manifest: a run refuses
# to add rows to an output another version wrote. 3: + DICOM identifiers; a nullable
# out_of_distribution (null with --no-ood-check).
SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = b"brainray.schema_version"
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
           pa.field(COL_INSTANCE_NUMBER, pa.int32())],
        metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


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
        # Ray hands an all-null column back as NaN, and bool(NaN) is True: not checked stays null
        COL_OOD: _where_ok(batch[COL_OOD], ok, lambda f: None if _is_missing(f) else bool(f)),
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


SCORES_DIR = "scores"
STAGING_DIR = "_staging"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
READY = "_READY"
MANIFEST_FORMAT = "brainray-scores-v2"
# A file copied into scores/ before its run is committed: hidden from pyarrow, pandas and Spark
# (leading dot) and from `read_parquet('scores/*.parquet')` globs (duckdb: not .parquet).
PENDING_PREFIX, PENDING_SUFFIX = ".pending-", ".parquet.tmp"
# For crash tests: the process SIGKILLs itself just before the commit step of this name
# (e.g. "manifest", "publish 1"), as a machine that dies there would.
KILL_BEFORE_ENV = "BRAINRAY_TEST_KILL_BEFORE"


def _step(name: str) -> None:
    if os.environ.get(KILL_BEFORE_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "runs": []}


def _manifest(output: str, options: StorageOptions) -> tuple[dict, str | None]:
    """The manifest and its version tag (None before the first commit)."""
    found = storage.read_versioned(storage.join(output, MANIFEST), options)
    if found is None:
        return _empty_manifest(), None
    return json.loads(found[0]), found[1]


def staging_uri(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def committed_runs(output: str, options: StorageOptions) -> list[dict]:
    """The manifest's committed runs, oldest first: each a run's summary, its run_id, its file
    names under scores/ and committed_at. Empty before the first commit."""
    return _manifest(output, options)[0]["runs"]


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


def published_classes(output: str, options: StorageOptions) -> list[str] | None:
    """The classes of the model(s) whose scores the output holds (None before the first
    commit): the order of its prob_<class> columns."""
    return _manifest(output, options)[0].get("classes")


def check_compatible(output: str, classes: list[str], options: StorageOptions) -> None:
    """Refuse, before any work, to add rows to an output whose files another schema version or
    another set of classes wrote: one dataset must read as one table."""
    manifest, _ = _manifest(output, options)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get(
            "schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{storage.redact(output)} was written by another brainray version (manifest "
            f"{manifest.get('format')}, schema {manifest.get('schema_version', 'unknown')}; "
            f"this one writes {MANIFEST_FORMAT}, schema {SCHEMA_VERSION}): score into a new "
            "--output")
    published = manifest.get("classes")
    if manifest["runs"] and published != list(classes):
        raise ValueError(f"{storage.redact(output)} holds scores for classes {published}, but "
                         f"the model was trained on {list(classes)}; score into another --output")


def current_index(output: str, options: StorageOptions) -> str | None:
    """The index file of what this output has scored (brainray.scored_index), by name."""
    runs = committed_runs(output, options)
    return runs[-1]["index"] if runs else None


def mark_ready(output: str, run_id: str, summary: dict, options: StorageOptions) -> None:
    """Record that the staged files are complete; from here on the run will be committed. The
    summary must name the run's `scoring_key` and `classes` (the commit records both)."""
    staging = staging_uri(output, run_id)
    files = [name for name in storage.list_children(staging, options) if name.endswith(".parquet")]
    storage.write_json(storage.join(staging, READY), {**summary, "files": files}, options)


def _final_name(run_id: str, staged: str) -> str:
    return f"part-{run_id}-{staged}"


def _pending_name(run_id: str, staged: str) -> str:
    return f"{PENDING_PREFIX}{run_id}-{staged.removesuffix('.parquet')}{PENDING_SUFFIX}"


def commit(output: str, run_id: str, options: StorageOptions) -> list[str]:
    """Commit a READY staged run (idempotent: a crash at any step is finished by `recover`).

    1. copy each staged file into scores/ under a hidden pending name;
    2. write the next index (brainray.scored_index);
    3. add the run to the manifest, only if it is unchanged since read: the commit point;
    4. rename each pending file to its final name (readers see the run from here);
    5. write _SUCCESS, delete the staging folder. What fails after 3 is a warning.
    """
    staging = staging_uri(output, run_id)
    ready = storage.read_json(storage.join(staging, READY), options)
    for i, staged in enumerate(ready["files"]):
        _step(f"copy {i}")
        storage.copy_file(storage.join(staging, staged),
                          scores_uri(output, _pending_name(run_id, staged)), options)
    manifest, version = _manifest(output, options)
    if run_id not in {run["run_id"] for run in manifest["runs"]}:
        _step("index")
        index = scored_index.write_next(output, run_id, current_index(output, options), staging,
                                        ready["scoring_key"], options)
        _step("manifest")
        _add_run(output, manifest, version, ready, run_id, index, options)
    return _finish(output, run_id, ready["files"], options)


def _add_run(output: str, manifest: dict, version: str | None, ready: dict, run_id: str,
             index: str, options: StorageOptions) -> None:
    entry = {**ready, "run_id": run_id, "index": index,
             "files": [_final_name(run_id, f) for f in ready["files"]],
             "committed_at": dt.datetime.now(dt.UTC).isoformat()}
    manifest = {**manifest, "classes": ready["classes"], "runs": [*manifest["runs"], entry]}
    try:
        storage.write_versioned(storage.join(output, MANIFEST),
                                json.dumps(manifest, indent=2, sort_keys=True).encode(), version,
                                options)
    except storage.PreconditionFailed as exc:
        raise RuntimeError(f"another run committed to {storage.redact(output)} while this one "
                           f"held its lease; run {run_id} is not committed and will be "
                           "recovered by the next run") from exc


def _finish(output: str, run_id: str, staged: list[str], options: StorageOptions) -> list[str]:
    """Steps 4-5 of `commit`, for a committed run: nothing here can undo the commit."""
    present = set(storage.list_children(storage.join(output, SCORES_DIR), options))
    try:
        for i, name in enumerate(staged):
            final, pending = _final_name(run_id, name), _pending_name(run_id, name)
            if final in present:
                continue
            _step(f"publish {i}")
            if pending in present:
                storage.move(scores_uri(output, pending), scores_uri(output, final), options)
            else:  # killed before this file's copy: straight from staging
                storage.copy_file(storage.join(staging_uri(output, run_id), name),
                                  scores_uri(output, final), options)
        _step("success")
        storage.write_json(storage.join(output, SUCCESS), {"run_id": run_id}, options)
        _delete_staging(output, run_id, options)
    except OSError as exc:  # StorageError included
        return [f"warning: run {run_id} is committed, but finishing it failed ({exc}); the "
                "next run finishes it"]
    return []


def _delete_staging(output: str, run_id: str, options: StorageOptions) -> None:
    """File by file (a crash can stop it anywhere: what is left is finished next time), READY
    last, then the folder."""
    staging = staging_uri(output, run_id)
    names = sorted(storage.list_children(staging, options), key=lambda n: n == READY)
    for i, name in enumerate(names):
        _step(f"cleanup {i}")
        storage.delete(storage.join(staging, name), options)
    storage.delete_dir(staging, options)


def recover(output: str, options: StorageOptions) -> list[str]:
    """Finish or discard what crashed runs left (the caller holds the output's lease, so no live
    run is writing): committed runs are finished, READY runs committed, others discarded (their
    images are scored again), and files no committed run names are swept. What was done, for
    the log."""
    done = []
    committed = {run["run_id"]: run for run in committed_runs(output, options)}
    for run_id in storage.list_children(storage.join(output, STAGING_DIR), options,
                                        folders=True):
        staging = staging_uri(output, run_id)
        if run_id in committed:
            staged = [f.removeprefix(f"part-{run_id}-") for f in committed[run_id]["files"]]
            done += [f"finished committed run {run_id}",
                     *_finish(output, run_id, staged, options)]
        elif storage.exists(storage.join(staging, READY), options):
            done += [f"committed interrupted run {run_id}", *commit(output, run_id, options)]
        else:
            storage.delete_dir(staging, options)
            done.append(f"discarded incomplete run {run_id}; its images are scored again")
    return done + _sweep(output, options)


def _sweep(output: str, options: StorageOptions) -> list[str]:
    """Delete pending copies and temporary files in scores/, and index files, that no committed
    run names (what a run killed before its commit point left)."""
    runs = committed_runs(output, options)
    kept = {name for run in runs for name in run["files"]}
    index = runs[-1]["index"] if runs else None
    swept = []
    for name in storage.list_children(storage.join(output, SCORES_DIR), options):
        if name not in kept and (name.startswith(PENDING_PREFIX) or ".tmp-" in name):
            storage.delete(scores_uri(output, name), options)
            swept.append(name)
    for name in storage.list_children(storage.join(output, scored_index.INDEX_DIR), options):
        if f"{scored_index.INDEX_DIR}/{name}" != index:
            storage.delete(storage.join(output, scored_index.INDEX_DIR, name), options)
            swept.append(f"{scored_index.INDEX_DIR}/{name}")
    return [f"removed {len(swept)} leftover file(s) of crashed runs"] if swept else []
