"""What a scoring output has already scored, in one small file whatever its history.

Each commit writes the next index: the previous one plus the inputs the run scored, one row per
input file (uri, size, mtime) with the scoring key that scored it (brainray.score: the model's
identity plus the settings that change a row). The manifest names the current index, so an
incremental run reads one file with four columns instead of every published Parquet file.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from brainray import storage
from brainray.config import StorageOptions

INDEX_DIR = "_index"
COL_KEY = "scoring_key"
_SOURCE = ("uri", "source_size", "source_mtime_ns")
SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("source_size", pa.int64()),
                    pa.field("source_mtime_ns", pa.int64()), pa.field(COL_KEY, pa.string())])


def index_name(run_id: str) -> str:
    return f"{INDEX_DIR}/keys-{run_id}.parquet"


def _read(uri: str, columns, options: StorageOptions) -> pa.Table:
    fs, path = storage.resolve(uri, options)
    try:
        return pq.read_table(path, filesystem=fs, columns=list(columns))
    except OSError as exc:
        raise storage.StorageError(f"cannot read {storage.redact(uri)}: {exc}") from exc


def run_keys(staging: str, scoring_key: str, options: StorageOptions) -> pa.Table:
    """The distinct input files of a run's staged rows, with the run's scoring key."""
    table = _read(staging, _SOURCE, options).group_by(list(_SOURCE)).aggregate([])
    keys = table.append_column(COL_KEY, pa.array([scoring_key] * table.num_rows, pa.string()))
    return keys.cast(SCHEMA)


def write_next(output: str, run_id: str, previous: str | None, staging: str, scoring_key: str,
               options: StorageOptions) -> str:
    """Write the index after this run (previous + the run's inputs); its name under output."""
    tables = [run_keys(staging, scoring_key, options)]
    if previous is not None:
        tables.insert(0, _read(storage.join(output, previous), SCHEMA.names, options))
    name = index_name(run_id)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(tables), sink)
    storage.write_bytes(storage.join(output, name), sink.getvalue().to_pybytes(), options)
    return name


def scored(output: str, index: str | None, scoring_key: str,
           options: StorageOptions) -> set[tuple[str, int, int]]:
    """(uri, size, mtime_ns) of every input already scored with this scoring key."""
    if index is None:
        return set()
    table = _read(storage.join(output, index), SCHEMA.names, options)
    mine = table.filter(pc.equal(table[COL_KEY], scoring_key))
    return set(zip(*(mine[c].to_pylist() for c in _SOURCE), strict=True))
