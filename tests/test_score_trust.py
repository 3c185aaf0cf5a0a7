"""The scoring actor's trust features without Ray: OOD column, review threshold from the
checkpoint (or the flag), Grad-CAM overlays of rows sent to review."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from brainray import ood
from brainray.checkpoint import make_checkpoint, serialize, with_fields
from brainray.cli import build_parser, score_config
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.explain import ReviewOverlays, review_overlay_name
from brainray.model import build_model
from brainray.presets import InferencePreset
from brainray.publish import DICOM_COLUMNS, output_schema, output_table
from brainray.score import Scorer, read_and_preprocess
from brainray.unpack import DicomTags, SourceLimits
from tests.conftest import encode, synthetic_scan, write_tree
from tests.test_ood import colour_photo, text_on_white

SIZE = 32


def _checkpoint_file(tmp_path, **fields):
    torch.manual_seed(0)
    payload = make_checkpoint(build_model("paper_cnn", 4, SIZE), model_name="paper_cnn",
                              classes=DEFAULT_CLASSES, preprocess=PreprocessConfig(SIZE),
                              config={}, metrics={}, epoch=1)
    path = tmp_path / f"model-{len(fields)}.pt"
    path.write_bytes(serialize(with_fields(payload, **fields)))
    return str(path)


@pytest.fixture
def batch(tmp_path):
    """One preprocessed block: four gray scans, a colour photo, a blank image, a document."""
    from PIL import Image

    files = {f"scan_{i}.png": encode(synthetic_scan(i % 4, i)) for i in range(4)}
    files.update({"photo.jpg": encode(colour_photo(), "JPEG"),
                  "blank.png": encode(Image.new("L", (64, 64), 255)),
                  "document.png": encode(text_on_white())})
    root = write_tree(tmp_path / "in", files)
    uris = sorted(str(p) for p in root.iterdir())
    blocks = list(read_and_preprocess(
        {"uri": np.array(uris, dtype=object), "size": np.array([1] * len(uris)),
         "mtime_ns": np.array([1] * len(uris))}, options=StorageOptions(),
        preset=InferencePreset(PreprocessConfig(SIZE)), limits=SourceLimits(),
        max_file_bytes=10**9))
    assert len(blocks) == 1
    return blocks[0]


def _score(tmp_path, batch, threshold=None, explain=False, **fields):
    """The scoring steps of the pipeline, in order: score, review overlays, published rows."""
    model = _checkpoint_file(tmp_path, **fields)
    scorer = Scorer(model, StorageOptions(), use_gpu=False, threshold=threshold, threads=1,
                    keep_images=explain)
    scored = scorer(batch)
    if explain:
        scored = ReviewOverlays(model, str(tmp_path / "review"), StorageOptions())(scored)
    return output_table(scored, classes=list(DEFAULT_CLASSES),
                        model_id=scorer.predictor.model_id, model_name="paper_cnn",
                        run_id="run").to_pandas()


def test_out_of_distribution_rows_are_flagged_and_sent_to_review(tmp_path, batch):
    rows = _score(tmp_path, batch, threshold=0.0, explain=True)
    rows.index = [uri.rsplit("/", 1)[-1] for uri in rows.uri]
    columns = list(rows.columns)  # columns are only ever added: after the original ones
    assert columns.index("out_of_distribution") > columns.index("run_id")
    assert rows.loc[["photo.jpg", "blank.png", "document.png"], "out_of_distribution"].all()
    assert not rows.filter(like="scan_", axis=0).out_of_distribution.any()
    # threshold 0: only out-of-distribution rows need review; they still get probabilities
    assert (rows.needs_review == rows.out_of_distribution).all()
    assert rows.loc["photo.jpg", "predicted_label"] in DEFAULT_CLASSES
    # and each row sent to review has its Grad-CAM overlay, named by content hash
    written = sorted(p.name for p in (tmp_path / "review").glob("*.png"))
    expected = sorted(review_overlay_name(sha, None)
                      for sha in rows[rows.needs_review].content_sha256)
    assert written == expected


def test_review_threshold_comes_from_the_checkpoint_unless_given(tmp_path, batch):
    probe = _score(tmp_path, batch, threshold=0.0)
    confidence = probe.confidence.to_numpy()
    middle = float(np.median(confidence))
    from_checkpoint = _score(tmp_path, batch, review_threshold=middle)
    assert (from_checkpoint.needs_review
            == ((from_checkpoint.confidence < middle) | from_checkpoint.out_of_distribution)).all()
    explicit = _score(tmp_path, batch, threshold=1.0, review_threshold=middle)
    assert explicit.needs_review.all()
    legacy = _score(tmp_path, batch)  # no review_threshold stored: 0.7 as before
    assert (legacy.needs_review == ((legacy.confidence < 0.7) | legacy.out_of_distribution)).all()


def test_calibrated_checkpoint_changes_confidence_not_labels(tmp_path, batch):
    plain = _score(tmp_path, batch, threshold=0.5)
    hot = _score(tmp_path, batch, threshold=0.5, temperature=3.0)
    assert (plain.predicted_label == hot.predicted_label).all()
    assert (hot.confidence <= plain.confidence + 1e-6).all()
    assert not np.allclose(hot.confidence, plain.confidence)


def test_ood_check_can_be_switched_off(tmp_path, batch):
    scorer = Scorer(_checkpoint_file(tmp_path), StorageOptions(), use_gpu=False, threshold=0.0,
                    threads=1, ood_check=False)
    rows = scorer(batch)
    assert not rows["out_of_distribution"].any() and not rows["needs_review"].any()


# The published columns as released, in order; a new column is appended here, never inserted.
PUBLISHED = ["uri", "member", "frame", "content_sha256", "predicted_label", "confidence",
             *[f"prob_{c}" for c in DEFAULT_CLASSES], "needs_review", "model_id", "model_name",
             "scored_at", "status", "error", "source_size", "source_mtime_ns", "run_id",
             "out_of_distribution",
             "study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality",
             "series_description", "instance_number"]


def test_the_published_schema_only_grows_at_the_end():
    names = output_schema(list(DEFAULT_CLASSES)).names
    assert names == PUBLISHED
    # the DICOM identity columns came last, and unpack.DicomTags carries one field per column
    assert names[-len(DICOM_COLUMNS):] == list(DICOM_COLUMNS)
    assert [f.name for f in dataclasses.fields(DicomTags)] == list(DICOM_COLUMNS)
    assert ood.DEFAULT_MEAN_RANGE[1] < 0.9  # documents (mostly white) stay outside


def test_score_flags_default_to_the_checkpoint_threshold():
    args = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o"])
    config = score_config(args)
    assert config.confidence_threshold is None and config.ood_check
    assert config.explain_review_dir is None
    args = build_parser().parse_args(["score", "--model", "m", "--input", "i", "--output", "o",
                                      "--confidence-threshold", "0.9", "--no-ood-check",
                                      "--explain-review-dir", "s3://b/review"])
    config = score_config(args)
    assert (config.confidence_threshold, config.ood_check, config.explain_review_dir) == (
        0.9, False, "s3://b/review")
