"""Exactly-once publishing of scoring runs into one Parquet dataset.

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

import pyarrow.parquet as pq

from brainray import storage
from brainray.config import StorageOptions

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


def published_files(output: str, options: StorageOptions) -> list[str]:
    """URIs of every committed Parquet file, oldest run first."""
    return [storage.join(output, SCORES_DIR, name)
            for run in _manifest(output, options)["runs"] for name in run["files"]]


def commit(output: str, run_id: str, options: StorageOptions) -> dict:
    """Copy a READY staging dir into scores/ and commit it in the manifest (idempotent)."""
    staging = staging_uri(output, run_id)
    ready = storage.read_json(storage.join(staging, READY), options)
    names = [f"part-{run_id}-{name}" for name in ready["files"]]
    for source, target in zip(ready["files"], names, strict=True):
        storage.copy_file(storage.join(staging, source),
                          storage.join(output, SCORES_DIR, target), options)
    manifest = _manifest(output, options)
    if run_id not in {run["run_id"] for run in manifest["runs"]}:
        entry = {**ready, "run_id": run_id, "files": names,
                 "committed_at": dt.datetime.now(dt.UTC).isoformat()}
        manifest["runs"].append(entry)
        storage.write_json(storage.join(output, MANIFEST), manifest, options)
    storage.write_json(storage.join(output, SUCCESS), {"run_id": run_id}, options)
    storage.delete_dir(staging, options)
    return manifest


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
            commit(output, run_id, options)
            done.append(f"committed interrupted run {run_id}")
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
                              columns=["uri", "source_size", "source_mtime_ns", "model_id"])
        columns = [table[c].to_pylist() for c in table.schema.names]
        keys.update((uri, size, mtime) for uri, size, mtime, row_model in zip(*columns, strict=True)
                    if row_model == model_id)
    return keys
