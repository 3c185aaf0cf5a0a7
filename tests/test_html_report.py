"""report.html: the page of a training run or evaluation (html_report.render_run_report, the
mistakes gallery of brainray.report) and of a scoring output (`brainray report`), parsed back
with the standard library's html.parser."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from brainray import calibration as cal
from brainray import cli, console, publish, report, storage
from brainray import metrics as metric_fns
from brainray.checkpoint import (
    ACCURACY_PNG,
    CONFUSION_PNG,
    COVERAGE_PNG,
    LOSS_PNG,
    RELIABILITY_PNG,
    make_checkpoint,
)
from brainray.config import COL_LABEL, COL_PATH, COL_PROBS, DEFAULT_CLASSES, PreprocessConfig
from brainray.data import sample_data_dir
from brainray.html_report import (
    PNG_SIGNATURE,
    REPORT_FILE,
    Gallery,
    Mistake,
    png_data_uri,
    render_run_report,
)
from brainray.model import build_model
from brainray.score_report import RowCounts, count_rows

RUN_SECTIONS = ["metrics", "per-class", "confusion", "curves", "calibration", "split",
                "leakage", "mistakes"]


class PageReader(HTMLParser):
    """What a reader of the page sees: section ids, images, tables as rows of cell texts, the
    text, and any tag that would fetch something from elsewhere."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.external: list[str] = []
        self.words: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.text = " ".join(" ".join(self.words).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(tag)
        elif tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr":
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.words.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def rows_of_facts(self) -> dict[str, str]:
        return {label: value for label, value in self.tables["facts"]}

    def rows(self, table_id: str) -> dict[str, list[str]]:
        """Body rows of a table by their first cell."""
        return {row[0]: row[1:] for row in self.tables[table_id][1:]}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _assert_valid_png_data_uris(sources: list[str]) -> None:
    assert sources
    for src in sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        Image.open(io.BytesIO(data)).verify()


@pytest.fixture
def said(monkeypatch) -> io.StringIO:
    """What brainray's console says during the test (the console keeps the stream it was made
    with, so capsys would miss it)."""
    stream = io.StringIO()
    monkeypatch.setattr(console, "_CONSOLE", console.Console(stream))
    return stream


def _tiny_png(value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _training_metrics() -> tuple[dict, dict[str, bytes]]:
    """A training run's metrics.json content and its figures, from synthetic predictions."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    logits = rng.normal(size=(len(y), 4))
    logits[np.arange(len(y)), y] += 2.0
    probs = cal.softmax(logits)
    frame = pd.DataFrame({COL_PATH: [f"/d/{i}.png" for i in range(len(y))], COL_LABEL: y,
                          COL_PROBS: list(probs)})
    result = cal.calibrate_run(frame, frame, 0.95)
    metrics = metric_fns.classification_metrics(y, probs, DEFAULT_CLASSES)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                "train_accuracy": 0.5 + e / 10, "val_accuracy": 0.45 + e / 10} for e in (1, 2, 3)]
    metrics.update(
        result.report, model_name="bn_cnn", model_id="0123abcd", history=history, best_epoch=3,
        training_wall_s=12.3, skipped_files=[{"path": "/d/bad.png", "error": "empty"}],
        baseline_1nn={"method": "1-NN on thumbnails", "accuracy": 0.4321,
                      "accuracy_ci95": [0.35, 0.52], "macro_f1": 0.41, "n_images": 120},
        near_duplicates={"method": "cosine", "n_images": 120, "median": 0.91,
                         "share_above_0.95": 0.125, "share_above_0.99": 0.025},
        split={"n_images": 600, "n_groups": 590, "n_duplicate_groups": 8,
               "n_images_in_duplicate_groups": 18,
               "counts": {"train": {c: 120 for c in DEFAULT_CLASSES},
                          "val": {c: 15 for c in DEFAULT_CLASSES},
                          "test": {c: 30 for c in DEFAULT_CLASSES}}})
    figs = {CONFUSION_PNG: metric_fns.render_confusion_matrix(metrics["confusion_matrix"],
                                                              DEFAULT_CLASSES),
            LOSS_PNG: metric_fns.render_loss_curve(history),
            ACCURACY_PNG: metric_fns.render_accuracy_curve(history),
            RELIABILITY_PNG: result.reliability_png, COVERAGE_PNG: result.coverage_png}
    return metrics, figs


def _gallery(n: int = 2) -> Gallery:
    return Gallery(tuple(Mistake(f"/d/wrong_{i}.png", "glioma", "meningioma", 0.9 - i / 10,
                                 _tiny_png(i)) for i in range(n)))


@pytest.fixture(scope="module")
def training_page() -> tuple[dict, PageReader]:
    metrics, figs = _training_metrics()
    return metrics, PageReader(render_run_report(metrics, figs, _gallery()))


# --- the page of a training run -----------------------------------------------------------------


def test_a_training_page_has_every_section_and_only_embedded_pngs(training_page):
    # Given a training run's metrics and figures / When its page is rendered (fixture)
    _, page = training_page
    # Then every section is there, in reading order
    assert page.sections == RUN_SECTIONS
    # and the five plots and two overlays are valid PNG data URIs; nothing is fetched from
    # elsewhere
    assert len(page.images) == 7
    _assert_valid_png_data_uris(page.images)
    assert page.external == []


def test_the_headline_numbers_are_metrics_json_s_beside_the_baseline(training_page):
    # Given the page of a training run (fixture)
    metrics, page = training_page
    # When its metrics table is read back
    header, rows = page.tables["metrics-table"][0], page.rows("metrics-table")
    # Then accuracy and its 95% CI, and the baseline's, are the metrics' own
    assert header == ["metric", "model", "1-NN baseline"]
    low, high = metrics["accuracy_ci95"]
    assert rows["accuracy"][0] == (f"{_pct(metrics['accuracy'])} (95% CI {_pct(low)}–"
                                   f"{_pct(high)})")
    assert rows["accuracy"][1] == "43.2% (95% CI 35.0%–52.0%)"
    assert rows["macro F1"] == [f"{metrics['macro_f1']:.3f}", "0.410"]
    assert rows["images"] == ["120", "120"]


def test_per_class_and_confusion_tables_are_metrics_json_s(training_page):
    # Given the page of a training run (fixture) / When the per-class and confusion tables
    # are read back
    metrics, page = training_page
    per_class, confusion = page.rows("per-class-table"), page.rows("confusion-table")
    # Then every class's precision, recall, F1 and support, and every confusion cell, match
    assert page.tables["per-class-table"][0] == ["class", "precision", "recall", "F1",
                                                 "ROC-AUC", "support"]
    for name, row in metrics["per_class"].items():
        assert per_class[name][:3] == [f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                                       f"{row['f1']:.3f}"]
        assert per_class[name][4] == str(row["support"])
    for name, cm_row in zip(DEFAULT_CLASSES, metrics["confusion_matrix"], strict=True):
        assert confusion[name] == [str(v) for v in cm_row]


def test_calibration_split_and_leakage_numbers_are_metrics_json_s(training_page):
    # Given the page of a training run (fixture) / When its other tables are read back
    metrics, page = training_page
    calibration = page.rows("calibration-table")
    # Then temperature, review threshold, split counts and leakage shares match
    assert calibration["temperature T (fitted on validation)"] == [
        f"{metrics['calibration']['temperature']:.3f}"]
    assert calibration["review threshold (calibrated confidence)"] == [
        f"{metrics['abstention']['threshold']:.3f}"]
    assert calibration["test coverage (accepted)"] == [
        _pct(metrics["abstention"]["test_coverage"])]
    assert page.rows("split-table")["test"] == ["30", "30", "30", "30", "120"]
    assert page.rows("leakage-table")["share above 0.95"] == ["12.5%"]
    assert page.rows("leakage-table")["share above 0.99"] == ["2.5%"]


def test_the_gallery_shows_each_mistake_with_its_labels_and_path(training_page):
    # Given a gallery of two mistakes (fixture) / When the page is read
    metrics, page = training_page
    wrong = metrics["n_images"] - np.trace(metrics["confusion_matrix"])
    # Then it says how many of all mistakes it shows, and each card names labels and path
    assert f"The 2 most confident of {wrong} wrong predictions" in page.text
    assert "true glioma, predicted meningioma (confidence 0.900)" in page.text
    assert "/d/wrong_1.png" in page.text


# --- the page of an evaluation, and what is missing -----------------------------------------


def test_an_evaluation_page_leaves_out_what_evaluation_does_not_have():
    # Given an evaluation's metrics: no history, split, baseline, calibration or leakage
    y = np.array([0, 1, 2, 3, 0, 1])
    probs = np.eye(4)[[0, 1, 2, 3, 1, 1]] * 0.7 + 0.075
    metrics = {**metric_fns.classification_metrics(y, probs, DEFAULT_CLASSES),
               "model_name": "bn_cnn", "model": "s3://b/runs/r1/model.pt", "data": "s3://b/test",
               "skipped_files": []}
    figs = {CONFUSION_PNG: metric_fns.render_confusion_matrix(metrics["confusion_matrix"],
                                                              DEFAULT_CLASSES)}
    # When its page is rendered
    page = PageReader(render_run_report(metrics, figs, Gallery()))
    # Then only the sections it has data for are there, and no baseline column
    assert page.sections == ["metrics", "per-class", "confusion", "mistakes"]
    assert page.tables["metrics-table"][0] == ["metric", "model"]
    assert "Evaluation: bn_cnn" in page.text
    facts = page.rows_of_facts()
    assert facts["checkpoint"] == "s3://b/runs/r1/model.pt" and facts["data"] == "s3://b/test"
    _assert_valid_png_data_uris(page.images)


def test_a_run_without_mistakes_says_so():
    # Given metrics of a perfect model
    y = np.arange(4)
    metrics = {**metric_fns.classification_metrics(y, np.eye(4), DEFAULT_CLASSES),
               "skipped_files": []}
    # When rendered with an empty gallery / Then the mistakes section says there are none
    page = PageReader(render_run_report(metrics, {}, Gallery()))
    assert "mistakes" in page.sections
    assert "No mistakes on the 4 images." in page.text


def test_a_failed_gallery_is_explained_on_the_page():
    # Given metrics with a mistake and a gallery that could not be made
    y = np.array([0, 1, 2, 3])
    metrics = {**metric_fns.classification_metrics(y, np.eye(4)[[0, 1, 2, 2]], DEFAULT_CLASSES),
               "skipped_files": []}
    # When rendered / Then the page says why there are no overlays
    page = PageReader(render_run_report(metrics, {}, Gallery(error="RuntimeError: boom")))
    assert "1 wrong prediction; the gallery could not be made: RuntimeError: boom" in page.text
    assert page.images == []


def test_values_from_the_data_are_escaped_not_run():
    # Given a mistake whose path holds markup
    metrics, _ = _training_metrics()
    evil = '/d/<script>alert("x")</script>.png'
    gallery = Gallery((Mistake(evil, "glioma", "notumor", 0.8, None),))
    # When rendered / Then the path is shown as text, and no script tag exists
    page = PageReader(render_run_report(metrics, {}, gallery))
    assert page.external == []
    assert evil in page.text
    assert "no Grad-CAM overlay for this image" in page.text


def test_an_empty_grad_cam_map_is_called_empty():
    # Given a mistake whose map has no positive evidence for the predicted class
    metrics, _ = _training_metrics()
    gallery = Gallery((Mistake("/d/x.png", "glioma", "notumor", 0.8, _tiny_png(), True),))
    # When rendered / Then its card says the map is empty rather than showing a blank heatmap
    page = PageReader(render_run_report(metrics, {}, gallery))
    assert "the map is empty: no positive evidence for it" in page.text


def test_only_png_bytes_become_data_uris():
    with pytest.raises(ValueError, match="PNG"):
        png_data_uri(b"GIF89a...")


# --- the gallery of the most confident mistakes (brainray.report) -----------------------------


def _predictions() -> pd.DataFrame:
    probs = np.array([[0.9, 0.05, 0.03, 0.02],   # right
                      [0.2, 0.7, 0.05, 0.05],    # glioma as meningioma, 0.7
                      [0.05, 0.05, 0.1, 0.8],    # meningioma as pituitary, 0.8
                      [0.3, 0.3, 0.35, 0.05],    # pituitary as notumor, 0.35
                      [0.1, 0.1, 0.7, 0.1]])     # notumor, right
    return pd.DataFrame({COL_PATH: [f"/t/{i}.png" for i in range(5)],
                         COL_LABEL: [0, 0, 1, 3, 2], COL_PROBS: list(probs)})


def test_most_confident_mistakes_are_the_wrong_ones_most_confident_first():
    # Given predictions with three mistakes / When the two most confident are picked
    wrong = report.most_confident_mistakes(_predictions(), limit=2)
    # Then they are the wrong rows in decreasing confidence
    assert wrong[COL_PATH].tolist() == ["/t/2.png", "/t/1.png"]
    assert wrong["predicted"].tolist() == [3, 1]
    assert wrong["confidence"].tolist() == pytest.approx([0.8, 0.7])


def test_the_gallery_fetches_only_the_mistakes_and_draws_their_grad_cam(monkeypatch):
    # Given a tiny model and a dataset stand-in that records which paths were asked for
    model = build_model("bn_cnn", 4, 32)
    checkpoint = make_checkpoint(model, model_name="bn_cnn", classes=DEFAULT_CLASSES,
                                 preprocess=PreprocessConfig(32), config={}, metrics={}, epoch=1)
    asked = []

    def take_images(dataset, paths):
        asked.extend(paths)
        return {p: np.full((32, 32), 100, dtype=np.uint8) for p in paths}

    monkeypatch.setattr(report, "take_images", take_images)
    # When the gallery of the two most confident mistakes is made
    gallery = report.mistake_gallery("dataset", _predictions(), checkpoint, limit=2)
    # Then only their images were fetched, and each has labels, confidence and a PNG overlay
    assert gallery.error is None and asked == ["/t/2.png", "/t/1.png"]
    assert [(m.true_label, m.predicted_label) for m in gallery.mistakes] == [
        ("meningioma", "pituitary"), ("glioma", "meningioma")]
    assert gallery.mistakes[0].confidence == pytest.approx(0.8)
    assert all(m.overlay_png.startswith(PNG_SIGNATURE) for m in gallery.mistakes)


def test_a_gallery_that_fails_says_why_and_does_not_raise(monkeypatch, said):
    # Given fetching the images fails
    def take_images(dataset, paths):
        raise RuntimeError("object store lost")

    monkeypatch.setattr(report, "take_images", take_images)
    # When the gallery is made / Then it carries the reason, and a warning is printed
    gallery = report.mistake_gallery("dataset", _predictions(), {"classes": DEFAULT_CLASSES})
    assert gallery.error == "RuntimeError: object store lost"
    assert "warning: no mistakes gallery" in said.getvalue()


def test_a_page_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path, said):
    # Given an output "directory" that is a regular file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    metrics, figs = _training_metrics()
    # When the page is written there / Then nothing is raised and the warning names the page
    report.write_html_report(str(blocker), metrics, figs, None, Gallery())
    assert f"warning: {blocker}/{REPORT_FILE} was not written" in said.getvalue()


# --- `brainray report` on a scoring output ------------------------------------------------------


def _scored_rows(rows: list[tuple]) -> dict[str, np.ndarray]:
    """A scored batch as brainray.score hands it to publish.output_table; rows are
    (uri, probs or None for an error, error text, needs_review, out_of_distribution)."""
    n = len(rows)
    probs = [p if p is not None else [np.nan] * 4 for _, p, _, _, _ in rows]
    return {publish.COL_URI: np.array([r[0] for r in rows], dtype=object),
            publish.COL_MEMBER: np.array([None] * n, dtype=object),
            publish.COL_FRAME: np.array([None] * n, dtype=object),
            publish.COL_SHA256: np.array([f"sha{r[0]}" for r in rows], dtype=object),
            publish.COL_STATUS: np.array([publish.STATUS_ERROR if r[1] is None
                                          else publish.STATUS_OK for r in rows], dtype=object),
            publish.COL_ERROR: np.array([r[2] for r in rows], dtype=object),
            publish.COL_SOURCE_SIZE: np.arange(n), publish.COL_SOURCE_MTIME: np.arange(n),
            publish.COL_PROBS: np.array(probs, dtype=np.float32),
            publish.COL_NEEDS_REVIEW: np.array([r[3] for r in rows]),
            publish.COL_OOD: np.array([r[4] for r in rows])}


GLIOMA, MENINGIOMA, PITUITARY = [0.9, 0.05, 0.03, 0.02], [0.1, 0.6, 0.2, 0.1], [0, 0, 0.05, 0.95]
RUN_1 = [("a", GLIOMA, "", False, False), ("b", GLIOMA, "", False, False),
         ("c", MENINGIOMA, "", True, False), ("d", None, "empty file (0 bytes)", None, None)]
RUN_2 = [("e", PITUITARY, "", False, False), ("f", MENINGIOMA, "", True, True),
         ("g", None, "empty file (0 bytes)", None, None),
         ("h", None, "not a decodable image: truncated", None, None)]


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _publish_run(output: str, run_id: str, rows: list[tuple], threshold: float,
                 options=None) -> None:
    """Stage and commit one run with publish's own functions (the manifest as scoring writes
    it)."""
    table = publish.output_table(_scored_rows(rows), classes=list(DEFAULT_CLASSES),
                                 model_id="model-1", model_name="bn_cnn", run_id=run_id)
    staging = publish.staging_uri(output, run_id)
    storage.write_bytes(storage.join(staging, "0.parquet"), _parquet(table), options)
    summary = {**publish.summarize(staging, options, threshold), "files": len(rows),
               "model_id": "model-1", "scoring_key": "key-1", "classes": list(DEFAULT_CLASSES),
               "run_id": run_id}  # as brainray.score.run_scoring adds
    publish.mark_ready(output, run_id, summary, options)
    assert publish.commit(output, run_id, options) == []


def _make_scoring_output(output: str, options=None) -> str:
    """Two committed runs, plus what must not be counted: a run still staging and a copy in
    scores/ that no manifest names (a crash between copying and committing)."""
    _publish_run(output, "run-1", RUN_1, 0.7, options)
    _publish_run(output, "run-2", RUN_2, 0.65, options)
    stray = _parquet(publish.output_table(
        _scored_rows([("x", GLIOMA, "", False, False)] * 50), classes=list(DEFAULT_CLASSES),
        model_id="model-1", model_name="bn_cnn", run_id="run-3"))
    storage.write_bytes(storage.join(publish.staging_uri(output, "run-3"), "0.parquet"), stray,
                        options)
    storage.write_bytes(publish.scores_uri(output, "part-run-3-0.parquet"), stray, options)
    return output


@pytest.fixture
def scoring_output(tmp_path) -> str:
    return _make_scoring_output(str(tmp_path / "scores"))


def test_brainray_report_counts_only_committed_rows(scoring_output, said):
    # Given a scoring output with two committed runs, one run staging and a stray copy
    # When `brainray report` runs on it
    assert cli.run(["report", scoring_output]) == 0
    with open(f"{scoring_output}/{REPORT_FILE}", encoding="utf-8") as f:
        page = PageReader(f.read())
    # Then the overview counts the 8 committed rows only: 5 scored, 3 errors, 2 to review
    # (of the 5 scored), 1 out of distribution
    assert page.sections == ["overview", "classes", "confidence", "errors", "runs"]
    overview = page.rows("overview-table")
    assert overview["all"][0] == "8"
    assert overview["scored (status ok)"][0] == "5"
    assert overview["errors (status error)"] == ["3", "37.5% of rows"]
    assert overview["needs review"] == ["2", "40.0% of scored rows"]
    assert overview["out of distribution"] == ["1", "20.0% of scored rows"]
    assert "report of 8 row(s) from 2 committed run(s)" in said.getvalue()


def test_brainray_report_shows_classes_errors_runs_and_the_histogram(scoring_output):
    # Given the scoring output / When `brainray report` runs on it
    assert cli.run(["report", scoring_output]) == 0
    with open(f"{scoring_output}/{REPORT_FILE}", encoding="utf-8") as f:
        page = PageReader(f.read())
    # Then every class of the model is listed with its rows, zeros included
    assert page.rows("classes-table") == {"glioma": ["2", "40.0%"],
                                          "meningioma": ["2", "40.0%"],
                                          "notumor": ["0", "0.0%"],
                                          "pituitary": ["1", "20.0%"]}
    # and error reasons with counts, most frequent first
    assert page.tables["errors-table"][1:] == [["empty file (0 bytes)", "2"],
                                               ["not a decodable image: truncated", "1"]]
    # and each committed run in commit order, with its own rows, errors and reviews
    runs = page.rows("runs-table")
    assert list(runs) == ["run-1", "run-2"]
    assert runs["run-1"][1:] == ["model-1", "0.700", "4", "1", "1", "0"]
    assert runs["run-2"][1:] == ["model-1", "0.650", "4", "2", "1", "1"]
    # and the one image is the confidence histogram, embedded
    assert len(page.images) == 1
    _assert_valid_png_data_uris(page.images)
    assert page.external == []


def test_brainray_report_out_writes_the_page_elsewhere(scoring_output, tmp_path):
    # Given --out / When `brainray report` runs / Then the page is there and not in the output
    out = tmp_path / "elsewhere" / "page.html"
    assert cli.run(["report", scoring_output, "--out", str(out)]) == 0
    assert PageReader(out.read_text(encoding="utf-8")).sections[0] == "overview"
    assert not (tmp_path / "scores" / REPORT_FILE).exists()


@pytest.mark.s3
def test_brainray_report_reads_and_writes_a_scoring_output_in_s3(s3_bucket, s3_options):
    # Given the same scoring output in a bucket on the moto server
    _, bucket = s3_bucket
    output = _make_scoring_output(f"s3://{bucket}/scores", s3_options)
    # When `brainray report` runs on it
    flags = ["--s3-endpoint", s3_options.s3_endpoint, "--s3-region", "us-east-1"]
    assert cli.run(["report", output, *flags]) == 0
    # Then the page is written beside the rows and counts the committed rows only
    page = PageReader(storage.read_bytes(f"{output}/{REPORT_FILE}", s3_options).decode())
    assert page.rows("overview-table")["all"][0] == "8"
    assert list(page.rows("runs-table")) == ["run-1", "run-2"]


def test_brainray_report_on_an_output_without_commits_fails_naming_it(tmp_path, capsys):
    # Given a folder nothing was committed to / When reported on / Then exit 1 with its name
    assert cli.run(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "no committed scoring run" in err


def test_a_file_older_than_a_column_reads_it_as_nulls(tmp_path):
    # Given a published file written before the out_of_distribution column existed
    table = publish.output_table(_scored_rows(RUN_1), classes=list(DEFAULT_CLASSES),
                                 model_id="m", model_name="bn_cnn", run_id="r")
    path = tmp_path / "old.parquet"
    pq.write_table(table.drop_columns([publish.COL_OOD]), str(path))
    # When the report's columns are read and counted
    columns = (publish.COL_STATUS, publish.COL_ERROR, publish.COL_PREDICTED,
               publish.COL_CONFIDENCE, publish.COL_NEEDS_REVIEW, publish.COL_OOD)
    read = publish.read_columns(str(path), columns, None)
    counts = count_rows(read)
    # Then only those columns come back, the missing one as nulls, and nothing is flagged OOD
    assert read.column_names == list(columns)
    assert read[publish.COL_OOD].null_count == 4
    assert (counts.rows, counts.ok, counts.errors, counts.out_of_distribution) == (4, 3, 1, 0)


def test_counts_of_two_files_add_up_to_the_counts_of_both():
    # Given the rows of two runs, counted separately and together
    def table(rows):
        return publish.output_table(_scored_rows(rows), classes=list(DEFAULT_CLASSES),
                                    model_id="m", model_name="n", run_id="r")

    together = count_rows(pa.concat_tables([table(RUN_1), table(RUN_2)]))
    # When the separate counts are added / Then they equal the counts of all rows
    assert count_rows(table(RUN_1)) + count_rows(table(RUN_2)) == together
    assert sum(together.confidence) == together.ok == 5
    assert together + RowCounts() == together


# --- end to end: a tiny training run and an evaluation on the embedded sample -----------------


def _page_of(path: Path) -> PageReader:
    return PageReader(path.read_text(encoding="utf-8"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_run_and_an_evaluation_write_their_report_html(trained_run, tmp_path):
    # Given a two-epoch run at 32 px (fixture)
    run_dir = trained_run.run_dir
    eval_dir = tmp_path / "eval"
    # When its model is evaluated on the embedded sample
    assert cli.run(["evaluate", "--model", str(run_dir), "--data", sample_data_dir(),
                    "--output", str(eval_dir), "--no-gpu"]) == 0
    # Then the run's page has every section, its accuracy is metrics.json's, and its gallery
    # shows overlays or says there were no mistakes
    metrics = json.loads((run_dir / "metrics.json").read_text())
    page = _page_of(run_dir / REPORT_FILE)
    assert page.sections == RUN_SECTIONS
    assert page.rows("metrics-table")["accuracy"][0].startswith(_pct(metrics["accuracy"]))
    _assert_valid_png_data_uris(page.images)
    mistakes = metrics["n_images"] - np.trace(metrics["confusion_matrix"])
    assert len(page.images) == 5 + min(mistakes, report.GALLERY_SIZE) or (
        mistakes == 0 and "No mistakes" in page.text)
    # and the evaluation's page has what an evaluation has, with its own numbers
    evaluation = json.loads((eval_dir / "metrics.json").read_text())
    page = _page_of(eval_dir / REPORT_FILE)
    assert page.sections == ["metrics", "per-class", "confusion", "mistakes"]
    assert page.rows("metrics-table")["images"] == [str(evaluation["n_images"])]
