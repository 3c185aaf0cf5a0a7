"""Scoring a corpus of unusual and hostile inputs (tests/corpus.py): every legitimate file gives
`ok` rows, every broken or hostile one `error` rows, and nothing crashes, hangs, writes outside
the output or takes unbounded memory.

The whole corpus is scored by ONE `brainray score` job (module fixture); the per-item tests then
assert on its rows. A pure layer checks each item in-process (no Ray), under a memory watch.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from brainray.cli import run
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.presets import InferencePreset
from brainray.score import display_uri, list_inputs, read_and_preprocess
from brainray.unpack import SourceLimits, is_archive
from tests.conftest import FAKE_KEY_ID, FAKE_SECRET
from tests.corpus import CORPUS, CORPUS_IDS, OK, CorpusItem, write_checkpoint, write_corpus

IMAGE_SIZE = 32
MEMORY_GROWTH_LIMIT = 200 * 1024**2  # per item; the bombs would need gigabytes if expanded
# logs/: the job's console log (brainray.console), checked below for credentials too
# _index/: what the output has scored; *.lock: the local stand-in for S3's conditional writes
OUTPUT_ENTRIES = {"scores", "_manifest.json", "_SUCCESS", "_staging", "logs", "_index",
                  "_manifest.json.lock", "_lease.json.lock"}


def _item_uri(root: Path, item: CorpusItem) -> str:
    """The `uri` value scoring must give the item: absolute, undecodable bytes %-encoded."""
    return display_uri(os.fsdecode(os.path.join(os.fsencode(root), item.path)))


def _snapshot(root: Path, exclude: Path) -> dict[bytes, tuple]:
    """Every entry under root (links not followed) with its type, size and mtime."""
    entries = {}
    base, skip = os.fsencode(root), os.fsencode(exclude)
    for folder, dirs, files in os.walk(base, followlinks=False):
        if folder == skip or folder.startswith(skip + b"/"):
            continue
        for name in dirs + files:
            path = os.path.join(folder, name)
            if path == skip:
                continue
            info = os.lstat(path)
            entries[os.path.relpath(path, base)] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return entries


def _score_argv(model: Path, inputs: Path, output: Path) -> list[str]:
    return ["score", "--model", str(model), "--input", str(inputs), "--output", str(output),
            "--no-gpu", "--batch-size", "16", "--files-per-task", "4"]


@pytest.fixture(scope="module")
def corpus_run(ray_cluster, tmp_path_factory):
    """Score the whole corpus once, then once more (incremental: nothing left to score)."""
    root = tmp_path_factory.mktemp("corpus").resolve()
    inputs, output = root / "in", root / "out"
    write_corpus(inputs)
    model = write_checkpoint(root / "model" / "model.pt", image_size=IMAGE_SIZE)
    before = _snapshot(root, exclude=output)
    started = time.perf_counter()
    code = run(_score_argv(model, inputs, output))
    wall_s = time.perf_counter() - started
    after = _snapshot(root, exclude=output)
    table = pq.read_table(output / "scores")
    rerun_code = run(_score_argv(model, inputs, output))
    return SimpleNamespace(root=root, inputs=inputs, output=output, code=code, wall_s=wall_s,
                           before=before, after=after, table=table, rows=table.to_pandas(),
                           rerun_code=rerun_code,
                           rerun_rows=pq.read_table(output / "scores").to_pandas())


def _rows_of(run_result, item: CorpusItem) -> pd.DataFrame:
    return run_result.rows[run_result.rows.uri == _item_uri(run_result.inputs, item)]


def _members(rows: pd.DataFrame) -> list[str]:
    """Archive member per row, "" for plain files (pandas reads an all-null column as NaN)."""
    return [m if isinstance(m, str) else "" for m in rows.member]


def _check_rows(rows: pd.DataFrame, item: CorpusItem) -> None:
    """The rows of one item are exactly the expected (member, status) pairs, with reasons."""
    rows = rows.assign(member=_members(rows))
    got = sorted(zip(rows.member, rows.status, strict=True))
    assert got == sorted(((r.member or ""), r.status) for r in item.rows), rows[
        ["member", "status", "error"]].to_dict("records")
    for expected in item.rows:
        row = rows[rows.member == (expected.member or "")].iloc[0]
        if expected.status == OK:
            assert pd.isna(row.error) or not row.error
            if "predicted_label" in row:  # a scored row, not the read step's output
                assert row.predicted_label in DEFAULT_CLASSES
        else:
            assert expected.error in row.error, row.error
            if "predicted_label" in row:
                assert pd.isna(row.predicted_label)


# --- the job, on the shared Ray cluster -------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("item", CORPUS, ids=CORPUS_IDS)
def test_corpus_item_is_scored_as_expected(corpus_run, item):
    # Given the corpus scored by one job / When looking at this item's rows
    rows = _rows_of(corpus_run, item)
    # Then they are the expected ok / error rows, each with a readable reason
    _check_rows(rows, item)
    if not is_archive(os.fsdecode(item.path)):  # a plain file: the sha is of its bytes
        assert set(rows.content_sha256) == {hashlib.sha256(item.build()).hexdigest()}


@pytest.mark.ray
@pytest.mark.slow
def test_corpus_job_succeeds_with_one_row_per_image_and_nothing_else(corpus_run):
    # The job committed (error rows are not a job failure)
    assert corpus_run.code == 0
    rows = corpus_run.rows
    # exactly the expected rows: none lost, none duplicated, none unexpected
    assert len(rows) == sum(len(item.rows) for item in CORPUS)
    keys = list(zip(rows.uri, _members(rows), rows.frame.fillna(-1), strict=True))
    assert len(set(keys)) == len(keys)
    expected_uris = {_item_uri(corpus_run.inputs, item) for item in CORPUS}
    assert set(rows.uri) == expected_uris
    assert rows.run_id.nunique() == 1


@pytest.mark.ray
@pytest.mark.slow
def test_corpus_job_writes_nothing_outside_its_output(corpus_run):
    # The input tree, the model and everything else under the test root is untouched
    assert corpus_run.after == corpus_run.before
    # no archive member was extracted anywhere, relative or absolute
    basetemp = corpus_run.root.parent
    assert not list(basetemp.rglob("x.jpg")) and not list(basetemp.rglob("evil.jpg"))
    assert not os.path.exists("/abs/evil.jpg") and not os.path.exists("/x.jpg")
    # and the output holds only the published dataset, its commit markers and the job's log
    output = corpus_run.output
    assert {p.name for p in output.iterdir()} <= OUTPUT_ENTRIES
    assert all(p.suffix == ".parquet" for p in (output / "scores").iterdir())
    assert not any((output / "_staging").iterdir())
    # nor any credential from the environment
    for path in output.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_SECRET.encode() not in data and FAKE_KEY_ID.encode() not in data


@pytest.mark.ray
@pytest.mark.slow
def test_uri_column_is_valid_utf8_and_non_utf8_names_round_trip(corpus_run):
    # Arrow validates UTF-8 in string columns on a full validation
    corpus_run.table.validate(full=True)
    odd = next(item for item in CORPUS if item.id == "non_utf8_name")
    uri = _item_uri(corpus_run.inputs, odd)
    assert uri.endswith("/odd/scan_%FF%FE.png")
    assert uri in set(corpus_run.rows.uri)
    long = next(item for item in CORPUS if item.id == "long_name")
    assert len(os.path.basename(long.path)) == 250
    assert _item_uri(corpus_run.inputs, long) in set(corpus_run.rows.uri)


@pytest.mark.ray
@pytest.mark.slow
def test_incremental_rerun_scores_nothing_again(corpus_run):
    # When the same tree is scored again (odd names included)
    assert corpus_run.rerun_code == 0
    # Then no row was added: every file, the non-UTF-8 one too, was recognised as scored
    assert len(corpus_run.rerun_rows) == len(corpus_run.rows)
    assert corpus_run.rerun_rows.run_id.nunique() == 1


# --- the pure layer: one item at a time, in-process ----------------------------------------


class _PeakRss:
    """Peak resident memory growth of this process while the block runs (sampled every ms)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.mark.parametrize("item", CORPUS, ids=CORPUS_IDS)
def test_corpus_item_is_read_without_exception_in_bounded_memory(item, tmp_path):
    # Given the item on disk (its name may not be UTF-8)
    path = os.path.join(os.fsencode(tmp_path), os.path.basename(item.path))
    with open(path, "wb") as f:
        f.write(item.build())
    info = os.stat(path)
    batch = {"uri": np.array([os.fsdecode(path)], dtype=object),
             "size": np.array([info.st_size]), "mtime_ns": np.array([info.st_mtime_ns])}
    # When the scoring read step expands and preprocesses it
    started = time.perf_counter()
    with _PeakRss() as memory:
        blocks = list(read_and_preprocess(
            batch, options=StorageOptions(),
            preset=InferencePreset(PreprocessConfig(image_size=IMAGE_SIZE)),
            limits=SourceLimits(), max_file_bytes=2 * 1024**3))
    elapsed = time.perf_counter() - started
    # Then no exception, bounded memory and time, and the expected rows
    assert memory.growth < MEMORY_GROWTH_LIMIT, f"grew {memory.growth / 2**20:.0f} MiB"
    assert elapsed < 30
    columns = [k for k in blocks[0] if k != "image"]
    rows = pd.DataFrame({k: [x for block in blocks for x in block[k]] for k in columns})
    _check_rows(rows, item)
    images = np.concatenate([block["image"] for block in blocks])
    assert images.shape == (len(rows), IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.uint8


def test_listing_an_input_tree_with_symlink_loops_terminates(tmp_path):
    # Given the corpus tree, whose loop/ folder links back to itself and to the root
    write_corpus(tmp_path)
    result: dict = {}

    def listing():
        result["files"] = list_inputs((str(tmp_path),), StorageOptions()).files

    # When it is listed (in a thread, so that a regression fails instead of hanging)
    thread = threading.Thread(target=listing, daemon=True)
    thread.start()
    thread.join(60)
    # Then the listing returns, with every corpus file once and nothing reached through a loop
    assert not thread.is_alive(), "listing the inputs did not return: a symlink loop is followed"
    uris = [f["uri"] for f in result["files"]]
    assert len(uris) == len(set(uris)) == len(CORPUS)
    assert not [u for u in uris if "/up/" in u or "/here/" in u]


def test_a_linked_folder_inside_the_input_keeps_its_own_path(tmp_path):
    # Given a month folder and "latest" links to it on either side of it in name order
    (tmp_path / "2026-11").mkdir()
    (tmp_path / "2026-11" / "a.png").write_bytes(b"x")
    (tmp_path / "0-latest").symlink_to("2026-11")
    (tmp_path / "z-latest").symlink_to("2026-11")
    # When listed / Then the file is listed once, under its real folder (a stable URI)
    files = list_inputs((str(tmp_path),), StorageOptions()).files
    assert [f["uri"] for f in files] == [str(tmp_path / "2026-11" / "a.png")]
