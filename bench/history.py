"""Cost of a scoring run against the output's history: how long finding "what is already
scored" takes after many committed runs (brainray.scored_index) against reading the uri columns
of every published file (what brainray did before the index), for the same number of rows.

    python -m bench.history                       # 100 runs x 1,000 rows vs 1 run x 100,000
    python -m bench.history --runs 300 --rows 1000 --s3   # on a moto S3 server

The outputs are built with brainray.publish itself (staging, READY, commit), from synthetic rows
in the published schema: no model or Ray is involved, only the storage layout under test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
import time

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from moto.server import ThreadedMotoServer

from brainray import publish, scored_index, storage
from brainray.config import DEFAULT_CLASSES, StorageOptions

CLASSES = list(DEFAULT_CLASSES)
KEY = "bench-key"


def _rows(run: int, n: int) -> pa.Table:
    batch = {"uri": np.array([f"/archive/run{run:04d}/{i:06d}.dcm" for i in range(n)],
                             dtype=object),
             "member": np.full(n, None, object), "frame": np.full(n, None, object),
             "content_sha256": np.array([f"{run}-{i}" for i in range(n)], dtype=object),
             "status": np.array(["ok"] * n, dtype=object), "error": np.full(n, None, object),
             "source_size": np.full(n, 1000), "source_mtime_ns": np.full(n, 1),
             publish.COL_PROBS: np.full((n, len(CLASSES)), 0.25, np.float32),
             publish.COL_NEEDS_REVIEW: np.zeros(n, bool), publish.COL_OOD: np.zeros(n, bool)}
    return publish.output_table(batch, classes=CLASSES, model_id="m", model_name="bn_cnn",
                                run_id=f"run{run}")


def build(output: str, runs: int, rows: int, options: StorageOptions) -> None:
    for run in range(runs):
        run_id = f"run-{run:04d}"
        sink = pa.BufferOutputStream()
        pq.write_table(_rows(run, rows), sink)
        storage.write_bytes(storage.join(publish.staging_uri(output, run_id), "0.parquet"),
                            sink.getvalue().to_pybytes(), options)
        publish.mark_ready(output, run_id, {"scoring_key": KEY, "classes": CLASSES}, options)
        publish.commit(output, run_id, options)


def _read_every_published_file(output: str, options: StorageOptions) -> int:
    """What finding the scored inputs cost before the index: every file's key columns."""
    keys = set()
    for uri in publish.published_files(output, options):
        table = publish.read_columns(uri, ("uri", "source_size", "source_mtime_ns"), options)
        keys.update(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))
    return len(keys)


def measure(output: str, options: StorageOptions, repeats: int = 3) -> dict:
    def timed(function) -> tuple[float, int]:
        best, result = float("inf"), 0
        for _ in range(repeats):
            started = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - started)
        return best, result

    index_s, n_index = timed(lambda: len(scored_index.scored(
        output, publish.current_index(output, options), KEY, options)))
    full_s, n_full = timed(lambda: _read_every_published_file(output, options))
    assert n_index == n_full, (n_index, n_full)
    return {"keys": n_index, "index_lookup_s": round(index_s, 3),
            "reading_every_published_file_s": round(full_s, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="committed runs of --rows rows")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--s3", action="store_true", help="on a moto S3 server on 127.0.0.1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root, _store(args.s3, root) as (base, options):
        results = {}
        for name, runs, rows in (("many_runs", args.runs, args.rows),
                                 ("one_run", 1, args.runs * args.rows)):
            output = storage.join(base, name)
            build(output, runs, rows, options)
            results[name] = {"runs": runs, "rows_per_run": rows, **measure(output, options)}
    print(json.dumps(results, indent=2))
    return results


@contextlib.contextmanager
def _local_store(root: str):
    yield root, StorageOptions()


@contextlib.contextmanager
def _moto_store():
    """A bucket on a moto S3 server on 127.0.0.1, for the length of the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="bench")
    try:
        yield "s3://bench", StorageOptions(s3_endpoint=endpoint, s3_region="us-east-1")
    finally:
        server.stop()


def _store(s3: bool, root: str):
    return _moto_store() if s3 else _local_store(root)


if __name__ == "__main__":
    main()
