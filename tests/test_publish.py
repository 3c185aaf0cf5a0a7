"""Tests for brainray.publish: the output's schema and the commit protocol, killed (SIGKILL) at
every step of a commit, locally and on S3; what readers see at each point; the index."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainray import publish, scored_index, storage
from brainray.config import DEFAULT_CLASSES, StorageOptions

CLASSES = list(DEFAULT_CLASSES)
KEY = "key-0001"
STEPS = ["copy 0", "copy 1", "index", "manifest", "publish 0", "publish 1", "success",
         "cleanup 0", "cleanup 1", "cleanup 2"]


def _rows(prefix: str, n: int) -> pa.Table:
    """n scored rows in the published schema, as the scoring pipeline shapes them."""
    probs = np.full((n, len(CLASSES)), 0.25, np.float32)
    batch = {"uri": np.array([f"{prefix}/{i:03d}.png" for i in range(n)], dtype=object),
             "member": np.full(n, None, object), "frame": np.full(n, None, object),
             "content_sha256": np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
             "status": np.array(["ok"] * n, dtype=object), "error": np.full(n, None, object),
             "source_size": np.full(n, 10), "source_mtime_ns": np.full(n, 20),
             publish.COL_PROBS: probs, publish.COL_NEEDS_REVIEW: np.zeros(n, bool),
             publish.COL_OOD: np.zeros(n, bool)}
    return publish.output_table(batch, classes=CLASSES, model_id="m", model_name="bn_cnn",
                                run_id="r")


def stage(output: str, run_id: str, options: StorageOptions, prefix: str = "in") -> None:
    """A finished, READY staging folder of two Parquet files (5 + 4 rows)."""
    for i, n in enumerate((5, 4)):
        sink = pa.BufferOutputStream()
        pq.write_table(_rows(f"{prefix}{i}", n), sink)
        storage.write_bytes(storage.join(publish.staging_uri(output, run_id), f"{i}.parquet"),
                            sink.getvalue().to_pybytes(), options)
    publish.mark_ready(output, run_id, {"scoring_key": KEY, "classes": CLASSES, "images": 9},
                       options)


def _in_subprocess(code: str, options: StorageOptions, kill_before: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if kill_before:
        env[publish.KILL_BEFORE_ENV] = kill_before
    setup = ("from brainray import publish; from brainray.config import StorageOptions; "
             f"options = StorageOptions({options.s3_endpoint!r}, {options.s3_region!r}); ")
    return subprocess.run([sys.executable, "-c", setup + code], env=env, timeout=120).returncode


def _visible_rows(output: str, options: StorageOptions) -> pd.DataFrame:
    """What a reader of scores/ sees: pandas/pyarrow on the folder and a '*.parquet' glob."""
    names = [n for n in storage.list_children(storage.join(output, "scores"), options)
             if n.endswith(".parquet") and not n.startswith((".", "_"))]
    frames = [pq.read_table(storage.resolve(storage.join(output, "scores", n), options)[1],
                            filesystem=storage.resolve(output, options)[0]).to_pandas()
              for n in names]
    return pd.concat(frames) if frames else pd.DataFrame({"uri": []})


def _check_complete(output: str, options: StorageOptions, run_ids: list[str]) -> None:
    runs = publish.committed_runs(output, options)
    assert [r["run_id"] for r in runs] == run_ids
    rows = _visible_rows(output, options)
    assert len(rows) == 9 * len(run_ids) and rows.uri.is_unique
    names = storage.list_children(storage.join(output, "scores"), options)
    assert sorted(names) == sorted(n for r in runs for n in r["files"])  # nothing pending
    assert storage.list_children(storage.join(output, "_staging"), options, folders=True) == []
    done = scored_index.scored(output, publish.current_index(output, options), KEY, options)
    assert done == {(u, 10, 20) for u in rows.uri}


@pytest.mark.parametrize("step", STEPS)
def test_a_commit_killed_at_any_step_is_finished_by_the_next_run(local_and_s3_output, step):
    uri, options = local_and_s3_output
    # Given a committed run, and a second READY run whose commit is SIGKILLed before `step`
    stage(uri, "run-1", options, prefix="a")
    publish.commit(uri, "run-1", options)
    stage(uri, "run-2", options, prefix="b")
    code = _in_subprocess(f"publish.commit({uri!r}, 'run-2', options)", options, step)
    assert code == -9  # it really died there
    # Then meanwhile readers see only committed rows: the first run's, and of the second at
    # most what its commit has published
    visible = set(_visible_rows(uri, options).uri)
    assert {f"a{i}/{j:03d}.png" for i, n in ((0, 5), (1, 4)) for j in range(n)} <= visible
    committed = any(r["run_id"] == "run-2" for r in publish.committed_runs(uri, options))
    assert committed or all(u.startswith("a") for u in visible)
    # When the next run recovers (in a process of its own), Then both runs are there, once
    assert _in_subprocess(f"print(publish.recover({uri!r}, options))", options) == 0
    _check_complete(uri, options, ["run-1", "run-2"])


def test_a_run_killed_before_ready_is_discarded(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    stage(uri, "run-1", options)
    storage.delete(storage.join(publish.staging_uri(uri, "run-1"), publish.READY), options)
    assert publish.recover(uri, options) == [
        "discarded incomplete run run-1; its images are scored again"]
    assert publish.committed_runs(uri, options) == []
    assert storage.list_children(storage.join(uri, "_staging"), options, folders=True) == []


def test_leftovers_of_killed_writes_are_swept_and_committed_files_kept(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    stage(uri, "run-1", options)
    publish.commit(uri, "run-1", options)
    scores = tmp_path / "out" / "scores"
    (scores / ".pending-run-9-0.parquet.tmp").write_bytes(b"partial")
    (scores / "part-run-9-0.parquet.tmp-1234abcd").write_bytes(b"partial")  # a killed write
    assert publish.recover(uri, options) == ["removed 2 leftover file(s) of crashed runs"]
    _check_complete(uri, options, ["run-1"])


def test_an_output_of_another_schema_version_is_refused(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    storage.write_json(storage.join(uri, publish.MANIFEST),
                       {"format": "brainray-scores-v1", "runs": [{"run_id": "old"}]}, options)
    with pytest.raises(ValueError, match="written by another brainray version.*new --output"):
        publish.check_compatible(uri, CLASSES, options)


def test_other_classes_are_refused_on_a_committed_output(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    stage(uri, "run-1", options)
    publish.commit(uri, "run-1", options)
    publish.check_compatible(uri, CLASSES, options)
    with pytest.raises(ValueError, match="holds scores for classes"):
        publish.check_compatible(uri, ["a", "b"], options)


def test_the_schema_carries_its_version_and_only_grows_at_the_end():
    schema = publish.output_schema(CLASSES)
    assert schema.metadata[publish.SCHEMA_VERSION_KEY] == str(publish.SCHEMA_VERSION).encode()
    assert schema.names[:4] == ["uri", "member", "frame", "content_sha256"]
    assert schema.names.index("out_of_distribution") > schema.names.index("run_id")


def test_dicom_identity_columns_are_published_and_null_when_absent():
    # given rows from a DICOM beside a batch shaped before the DICOM columns existed
    dicom = {publish.COL_STUDY_UID: ["1.2"], publish.COL_SERIES_UID: ["1.2.3"],
             publish.COL_SOP_UID: ["1.2.3.4"], publish.COL_MODALITY: ["MR"],
             publish.COL_SERIES_DESCRIPTION: ["AX T2"], publish.COL_INSTANCE_NUMBER: [12]}
    shaped = {"uri": np.array(["in/IM0001"], object), "member": np.full(1, None, object),
              "frame": np.array([0], object), "content_sha256": np.array(["s"], object),
              "status": np.array(["ok"], object), "error": np.full(1, None, object),
              "source_size": np.full(1, 10), "source_mtime_ns": np.full(1, 20),
              publish.COL_PROBS: np.full((1, len(CLASSES)), 0.25, np.float32),
              publish.COL_NEEDS_REVIEW: np.zeros(1, bool), publish.COL_OOD: np.zeros(1, bool)}
    # when shaped with and without them
    table = publish.output_table({**shaped, **{k: np.array(v, object) for k, v in dicom.items()}},
                                 classes=CLASSES, model_id="m", model_name="n", run_id="r")
    bare = publish.output_table(shaped, classes=CLASSES, model_id="m", model_name="n",
                                run_id="r")
    # then the values are published as given (instance number as int32), else null
    assert {k: table[k].to_pylist() for k in publish.DICOM_COLUMNS} == dicom
    assert table.schema.field(publish.COL_INSTANCE_NUMBER).type == pa.int32()
    assert all(bare[k].to_pylist() == [None] for k in publish.DICOM_COLUMNS)


def _readme_series_query(scores_glob: str) -> str:
    """The README's per-series duckdb query, pointed at `scores_glob`."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```sql\n")[1:]]
    query = next(b for b in blocks if "PARTITION BY uri, member, frame" in b)
    return query.replace("scores/scores/*.parquet", scores_glob)


def _slices(run_id: str, scored_at: dt.datetime, slices: list[tuple]) -> pa.Table:
    """Published rows of DICOM slices (series, instance, p_glioma, needs_review, status) and of
    one PNG, in the published schema."""
    n = len(slices) + 1
    glioma = np.array([s[2] for s in slices] + [0.9], np.float32)
    probs = np.stack([glioma, 1 - glioma, np.zeros(n), np.zeros(n)], 1).astype(np.float32)
    series = [s[0] for s in slices] + [None]
    batch = {"uri": np.array([f"in/{s[0]}-{s[1]}.dcm" for s in slices] + ["in/a.png"], object),
             "member": np.full(n, None, object), "frame": np.array([0] * n, object),
             "content_sha256": np.array([f"h{i}" for i in range(n)], object),
             "status": np.array([s[4] for s in slices] + ["ok"], object),
             "error": np.full(n, None, object), "source_size": np.full(n, 10),
             "source_mtime_ns": np.full(n, 20), publish.COL_PROBS: probs,
             publish.COL_NEEDS_REVIEW: np.array([s[3] for s in slices] + [False]),
             publish.COL_OOD: np.zeros(n, bool),
             publish.COL_STUDY_UID: np.array([s and "1.2" for s in series], object),
             publish.COL_SERIES_UID: np.array(series, object),
             publish.COL_SOP_UID: np.array([f"{s[0]}.{s[1]}" for s in slices] + [None], object),
             publish.COL_MODALITY: np.array([s and "MR" for s in series], object),
             publish.COL_SERIES_DESCRIPTION: np.array([s and f"AX {s}" for s in series], object),
             publish.COL_INSTANCE_NUMBER: np.array([s[1] for s in slices] + [None], object)}
    table = publish.output_table(batch, classes=CLASSES, model_id="m", model_name="bn_cnn",
                                 run_id=run_id)
    at = pa.array([scored_at] * n, table.schema.field(publish.COL_SCORED_AT).type)
    return table.set_column(table.schema.get_field_index(publish.COL_SCORED_AT),
                            publish.COL_SCORED_AT, at)


def test_the_readmes_per_series_query_summarises_the_latest_score_of_each_slice(tmp_path):
    # given series A (3 slices, slice 2 rescored by a later run) and B (2 slices, one an
    # error), beside a PNG, in two published files
    first = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    pq.write_table(_slices("r1", first, [("A", 1, 0.9, False, "ok"), ("A", 2, 0.2, True, "ok"),
                                         ("A", 3, 0.6, True, "ok"), ("B", 1, 0.4, False, "ok"),
                                         ("B", 2, 0.0, False, "error")]), tmp_path / "r1.parquet")
    pq.write_table(_slices("r2", first + dt.timedelta(days=1), [("A", 2, 0.8, False, "ok")]),
                   tmp_path / "r2.parquet")
    # when the README's query runs over them
    rows = duckdb.sql(_readme_series_query(f"{tmp_path}/*.parquet")).fetchall()
    # then one row per series: the rescored slice counts once with its latest score, the error
    # row and the PNG are left out, and series needing review come first
    summary = {r[1]: (r[2], r[3], round(r[4], 4), round(r[5], 4), r[-1]) for r in rows}
    assert [r[1] for r in rows] == ["A", "B"]
    assert summary == {"A": ("AX A", 3, 0.9, round((0.9 + 0.8 + 0.6) / 3, 4), 1),
                       "B": ("AX B", 1, 0.4, 0.4, 0)}


def test_the_index_is_one_file_that_grows_with_each_commit(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    for n, prefix in enumerate("abc", start=1):
        stage(uri, f"run-{n}", options, prefix=prefix)
        publish.commit(uri, f"run-{n}", options)
        index = publish.current_index(uri, options)
        assert index == scored_index.index_name(f"run-{n}")
        assert len(scored_index.scored(uri, index, KEY, options)) == 9 * n
    assert scored_index.scored(uri, index, "another-key", options) == set()
    publish.recover(uri, options)  # the older indexes are swept
    assert storage.list_children(storage.join(uri, "_index"), options) == ["keys-run-3.parquet"]


def test_the_manifest_is_written_only_if_unchanged_since_read(tmp_path):
    # Given a run about to commit against a manifest another writer has changed meanwhile
    uri, options = str(tmp_path / "out"), StorageOptions()
    stage(uri, "run-1", options)
    manifest, version = publish._manifest(uri, options)
    storage.write_versioned(storage.join(uri, publish.MANIFEST),
                            json.dumps(publish._empty_manifest()).encode(), version, options)
    ready = storage.read_json(storage.join(publish.staging_uri(uri, "run-1"), publish.READY),
                              options)
    # When it commits with the version it read, Then it refuses rather than overwrite
    with pytest.raises(RuntimeError, match="another run committed"):
        publish._add_run(uri, manifest, version, ready, "run-1", "idx", options)
