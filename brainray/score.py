"""The batch scoring job: archives in, one Parquet row per image (or DICOM frame) out, exactly once.

CPU tasks read files and expand archives/DICOM into images with the checkpoint's preprocessing; an
actor pool (one model per actor, a GPU each when the cluster has them) scores them; rows are staged
and committed atomically by `brainray.publish`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
import time
import urllib.parse
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from brainray import ood, publish, storage
from brainray.checkpoint import (
    load_checkpoint,
    locate_checkpoint,
    review_threshold_of,
)
from brainray.config import ScoreConfig, StorageOptions
from brainray.predict import Predictor
from brainray.presets import InferencePreset
from brainray.unpack import SourceLimits, expand, is_supported

STATUS_OK, STATUS_ERROR = "ok", "error"
IMAGES_PER_BLOCK = 64  # bounds memory when one archive expands into thousands of images
# Decoding runs in CPU tasks of their own beside the actors (a 1-CPU actor leaves room for two),
# on CPU and GPU clusters alike. A CPU request unlike the actors' keeps Ray Data from fusing the
# two steps, so the next batches decode while the model runs: on 2 cores, 3,000-image jobs took
# 27.7 / 27.1 s this way against 36.0 / 30.4 s fused into the actor (bench/scoring.py).
READ_TASK_CPUS = 0.5


def output_schema(classes: list[str]) -> pa.Schema:
    """The published schema; documented in the README. Columns are only ever added."""
    return pa.schema(
        [pa.field("uri", pa.string(), nullable=False),
         pa.field("member", pa.string()), pa.field("frame", pa.int32()),
         pa.field("content_sha256", pa.string()),
         pa.field("predicted_label", pa.string()), pa.field("confidence", pa.float32())]
        + [pa.field(f"prob_{name}", pa.float32()) for name in classes]
        + [pa.field("needs_review", pa.bool_()),
           pa.field("model_id", pa.string(), nullable=False),
           pa.field("model_name", pa.string(), nullable=False),
           pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
           pa.field("status", pa.string(), nullable=False), pa.field("error", pa.string()),
           pa.field("source_size", pa.int64()), pa.field("source_mtime_ns", pa.int64()),
           pa.field("run_id", pa.string(), nullable=False),
           # added: not brain MRI by brainray.ood's checks (such rows also get needs_review)
           pa.field("out_of_distribution", pa.bool_())])


def display_uri(uri: str) -> str:
    """A valid-UTF-8 URI: undecodable bytes in file names are percent-encoded."""
    raw = uri.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return urllib.parse.quote(raw, safe="/:!@=+,;~")


def _valid_utf8(text: str) -> str:
    """`text` with any surrogate-escaped bytes (from non-UTF-8 file names) made printable."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_inputs(inputs: tuple[str, ...], options: StorageOptions) -> list[dict]:
    """Every supported file under the input URIs, with size and mtime (metadata only)."""
    found: dict[str, dict] = {}
    for uri in inputs:
        try:
            entries = storage.list_files(uri, options)
        except storage.StorageError as exc:
            raise type(exc)(f"input {exc}") from exc
        for entry in entries:
            if is_supported(entry.path):
                found[entry.uri] = {"uri": entry.uri, "size": entry.size,
                                    "mtime_ns": entry.mtime_ns}
    return [found[k] for k in sorted(found)]


def _empty_rows() -> dict[str, list]:
    return {k: [] for k in ("uri", "member", "frame", "content_sha256", "status", "error",
                            "source_size", "source_mtime_ns", "image", "colour")}


OOD_COLUMNS = {"colour_fraction": "ood_colour_fraction", "std": "ood_std", "mean": "ood_mean"}


def _to_block(rows: dict[str, list], image_size: int) -> dict[str, np.ndarray]:
    block = {k: np.array(v, dtype=object) for k, v in rows.items() if k not in ("image", "colour")}
    block["image"] = (np.stack(rows["image"]) if rows["image"]
                      else np.zeros((0, image_size, image_size), np.uint8))
    # the OOD guard's statistics, computed here in CPU tasks that scale with the cluster's CPUs
    features = ood.image_features(block["image"], np.array(rows["colour"], dtype=np.float64))
    for name, column in OOD_COLUMNS.items():
        block[column] = features[name]
    return block


def read_and_preprocess(batch: dict[str, np.ndarray], *, options: StorageOptions,
                        preset: InferencePreset, limits: SourceLimits, max_file_bytes: int):
    """Input files -> blocks of preprocessed images, one row per image; failures become rows."""
    preprocess = preset.preprocess
    blank = np.zeros((preprocess.image_size, preprocess.image_size), np.uint8)
    rows = _empty_rows()
    for uri, size, mtime in zip(batch["uri"], batch["size"], batch["mtime_ns"], strict=True):
        if size > max_file_bytes:
            items, data = [], None
            error = f"file is {size} bytes, over the limit of {max_file_bytes}"
        else:
            try:
                data, error = storage.read_bytes(uri, options), ""
                items = expand(uri, data, limits)
            except storage.TransientStorageError:
                # Storage down or throttling past the retries: fail the job (nothing is
                # committed; the next run retries) rather than record the file as scored.
                raise
            except storage.StorageError as exc:
                items, data, error = [], None, _valid_utf8(str(exc))
        if not items:  # unreadable file, or an archive with no images
            digest = hashlib.sha256(data).hexdigest() if data else None
            items = [(None, None, None, digest, error or "no images found in file")]
        else:
            items = [(i.member, i.frame, i.image, i.content_sha256, i.error) for i in items]
        for member, frame, image, digest, item_error in items:
            pixels, colour = blank, 0.0
            if not item_error:
                try:
                    pixels, colour = preset.image(image)
                except (OSError, ValueError) as exc:
                    item_error = f"cannot preprocess image: {exc}"
            for key, value in (("uri", display_uri(uri)), ("member", member), ("frame", frame),
                               ("content_sha256", digest),
                               ("status", STATUS_ERROR if item_error else STATUS_OK),
                               ("error", item_error or None), ("source_size", int(size)),
                               ("source_mtime_ns", int(mtime)), ("image", pixels),
                               ("colour", colour)):
                rows[key].append(value)
            if len(rows["uri"]) >= IMAGES_PER_BLOCK:
                yield _to_block(rows, preprocess.image_size)
                rows = _empty_rows()
    if rows["uri"]:
        yield _to_block(rows, preprocess.image_size)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float | np.floating) and np.isnan(value))


def _arrow_column(values, arrow_type: pa.DataType) -> pa.Array:
    """Typed Arrow column from a batch column. Ray hands all-null columns back as float NaN, so
    missing values are normalised before typing."""
    cast = int if pa.types.is_integer(arrow_type) else None
    cleaned = [None if _is_missing(v) else (cast(v) if cast else v) for v in values]
    return pa.array(cleaned, type=arrow_type)


class Scorer:
    """One model per actor: scores the ok rows of a block and emits rows in the output schema."""

    def __init__(self, model_uri: str, options: StorageOptions, use_gpu: bool,
                 threshold: float | None, run_id: str, threads: int, ood_check: bool = True,
                 explain_dir: str | None = None):
        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.predictor = Predictor(model_uri, options, use_gpu=use_gpu)
        self.classes = self.predictor.classes
        self.model_name = self.predictor.model_name
        self.schema = output_schema(self.classes)
        # None: the review threshold stored in the checkpoint (chosen on validation), else 0.7
        self.threshold = review_threshold_of(
            {"review_threshold": self.predictor.review_threshold}, threshold)
        self.run_id = run_id
        self.ood_check = ood_check
        self.explainer = None
        if explain_dir:
            from brainray.explain import ReviewExplainer

            self.explainer = ReviewExplainer(self.predictor.model, self.predictor.temperature,
                                             self.classes, explain_dir, options,
                                             self.predictor.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        ok = np.array([s == STATUS_OK for s in batch["status"]], dtype=bool)
        probs = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.predictor.predict(batch["image"][ok])
        best = np.nan_to_num(probs, nan=-1.0).argmax(1)
        confidence = probs.max(1, initial=-np.inf, where=~np.isnan(probs))
        ood_flags, ood_reasons = np.zeros(n, dtype=bool), [""] * n
        if self.ood_check and ok.any():
            flags, reasons = ood.decide({name: np.asarray(batch[column], dtype=np.float64)[ok]
                                         for name, column in OOD_COLUMNS.items()},
                                        self.predictor.ood_reference)
            ood_flags[ok] = flags
            for i, reason in zip(np.flatnonzero(ok), reasons, strict=True):
                ood_reasons[i] = reason
        review = ok & ((confidence < self.threshold) | ood_flags)
        if self.explainer is not None and review.any():
            rows = np.flatnonzero(review)
            self.explainer.write(batch["image"][rows], [batch["content_sha256"][i] for i in rows],
                                 [batch["frame"][i] for i in rows], [ood_reasons[i] for i in rows])
        columns = {
            "uri": batch["uri"], "member": batch["member"], "frame": batch["frame"],
            "content_sha256": batch["content_sha256"],
            "predicted_label": [self.classes[b] if o else None for b, o in zip(best, ok,
                                                                              strict=True)],
            "confidence": [float(c) if o else None for c, o in zip(confidence, ok, strict=True)],
            **{f"prob_{name}": [float(p) if o else None for p, o in zip(probs[:, i], ok,
                                                                        strict=True)]
               for i, name in enumerate(self.classes)},
            "needs_review": [bool(r) if o else None for r, o in zip(review, ok, strict=True)],
            "model_id": [self.predictor.model_id] * n, "model_name": [self.model_name] * n,
            "scored_at": [dt.datetime.now(dt.UTC)] * n,
            "status": batch["status"], "error": batch["error"],
            "source_size": batch["source_size"], "source_mtime_ns": batch["source_mtime_ns"],
            "run_id": [self.run_id] * n,
            "out_of_distribution": [bool(f) if o else None for f, o in zip(ood_flags, ok,
                                                                           strict=True)],
        }
        return pa.table({k: _arrow_column(v, self.schema.field(k).type)
                         for k, v in columns.items()}, schema=self.schema)


def _summarize(staging: str, options: StorageOptions, threshold: float) -> dict:
    """Counts from the staged files (a few small columns; images never come back)."""
    fs, path = storage.resolve(staging, options)
    table = pq.read_table(path, filesystem=fs,
                          columns=["status", "predicted_label", "needs_review",
                                   "out_of_distribution"])
    status = Counter(table["status"].to_pylist())
    return {"images": table.num_rows, "ok": status.get(STATUS_OK, 0),
            "errors": status.get(STATUS_ERROR, 0),
            "predicted": dict(Counter(p for p in table["predicted_label"].to_pylist() if p)),
            "needs_review": sum(1 for r in table["needs_review"].to_pylist() if r),
            "out_of_distribution": sum(1 for r in table["out_of_distribution"].to_pylist() if r),
            "confidence_threshold": threshold}


def _check_output_classes(output: str, classes: list[str], options: StorageOptions) -> None:
    """One dataset holds one set of prob_ columns: refuse a model whose classes differ from those
    of the rows already published, before any work is done."""
    files = publish.published_files(output, options)
    if not files:
        return
    fs, path = storage.resolve(files[-1], options)
    names = pq.read_schema(path, filesystem=fs).names
    published = [name.removeprefix("prob_") for name in names if name.startswith("prob_")]
    if published != list(classes):
        raise ValueError(f"{storage.redact(output)} holds scores for classes {published}, but "
                         f"the model was trained on {list(classes)}; score into another --output")


def _files_per_task(config: ScoreConfig) -> int:
    """On CPU a whole batch of files per task (fewer, fuller tasks: +6% images/s on 2 cores).
    With GPUs, small tasks spread decoding over every CPU of the cluster."""
    return config.files_per_task if config.use_gpu else max(config.files_per_task,
                                                           config.batch_size)


def _scorer_remote_args(config: ScoreConfig) -> dict:
    """On CPU, two calls in flight per actor. Ray Data still runs the UDF one call at a time
    (`ActorPoolStrategy(enable_true_multi_threading=False)`), but fetching and batching the next
    input and handing back the last output overlap with it. Measured on 2 cores with decoding in
    separate tasks: 27.4 s mean per 3,000-image job with it, 28.2 s without (bench/scoring.py).
    Grad-CAM overlays keep per-call state in the model's hooks, so with --explain-review-dir it
    stays at one; GPU actors are left at Ray's default."""
    if config.use_gpu or config.explain_review_dir:
        return {}
    return {"max_concurrency": 2}


def _actor_threads(config: ScoreConfig) -> int:
    return config.threads_per_actor or max(1, (os.cpu_count() or 1) // config.concurrency)


def run_scoring(config: ScoreConfig) -> dict:
    print("brainray score\n" + storage.redacted_json(config), flush=True)
    options = config.storage
    storage.ensure_writable(config.output, options)
    model_uri = locate_checkpoint(config.model, options)
    checkpoint = load_checkpoint(model_uri, options)
    model_id = checkpoint["model_id"]
    threshold = review_threshold_of(checkpoint, config.confidence_threshold)
    print(f"needs_review below confidence {threshold:.3f} ("
          + ("--confidence-threshold" if config.confidence_threshold is not None else
             "the checkpoint's review threshold" if "review_threshold" in checkpoint else
             "default") + ")", flush=True)
    for line in publish.recover(config.output, options):
        print(line, flush=True)
    _check_output_classes(config.output, checkpoint["classes"], options)

    files = list_inputs(config.inputs, options)
    skipped = 0
    if config.incremental:
        done = publish.scored_keys(config.output, model_id, options)
        before = len(files)
        files = [f for f in files if (display_uri(f["uri"]), f["size"], f["mtime_ns"]) not in done]
        skipped = before - len(files)
    print(f"{len(files)} file(s) to score with model {checkpoint['model_name']} ({model_id}); "
          f"{skipped} already scored by this model", flush=True)
    if not files:
        return {"images": 0, "files": 0, "skipped_files": skipped, "model_id": model_id}

    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    staging = publish.staging_uri(config.output, run_id)
    started = time.perf_counter()
    context = ray.data.DataContext.get_current()
    raise_original = context.raise_original_map_exception
    # Tasks raise our own exceptions, not Ray's UserCodeException (which drops the cause), so a
    # storage outage while reading fails the job with its real one-line reason.
    context.raise_original_map_exception = True
    scored = (
        ray.data.from_items(files)
        .map_batches(read_and_preprocess, batch_size=_files_per_task(config),
                     num_cpus=READ_TASK_CPUS, fn_kwargs={
                         "options": options, "preset": InferencePreset.of(checkpoint),
                         "limits": SourceLimits(
                             max_image_pixels=checkpoint["preprocess"]["max_image_pixels"]),
                         "max_file_bytes": config.max_file_bytes})
        .map_batches(Scorer, batch_size=config.batch_size,
                     fn_constructor_kwargs={
                         "model_uri": model_uri, "options": options, "use_gpu": config.use_gpu,
                         "threshold": threshold, "run_id": run_id,
                         "threads": _actor_threads(config),
                         "ood_check": config.ood_check,
                         "explain_dir": config.explain_review_dir},
                     compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                     num_gpus=config.num_gpus_per_actor if config.use_gpu else 0,
                     **_scorer_remote_args(config)))
    fs, staging_path = storage.resolve(staging, options)
    try:
        scored.write_parquet(staging_path, filesystem=fs, min_rows_per_file=config.rows_per_file)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, storage.StorageError):
            raise exc.cause from None
        raise
    finally:
        context.raise_original_map_exception = raise_original
    wall_s = time.perf_counter() - started

    summary = {**_summarize(staging, options, threshold), "files": len(files),
               "skipped_files": skipped, "model_id": model_id, "run_id": run_id,
               "wall_s": wall_s}
    summary["images_per_s"] = summary["images"] / max(wall_s, 1e-9)
    publish.mark_ready(config.output, run_id, summary, options)
    publish.commit(config.output, run_id, options)
    _print_summary(summary, config.output)
    return summary


def _print_summary(summary: dict, output: str) -> None:
    print(f"scored {summary['images']} image(s) from {summary['files']} file(s) in "
          f"{summary['wall_s']:.1f} s ({summary['images_per_s']:.1f} images/s): "
          f"{summary['ok']} ok, {summary['errors']} error(s), {summary['needs_review']} to "
          f"review (confidence below {summary['confidence_threshold']:.3f} or out of "
          f"distribution: {summary['out_of_distribution']})", flush=True)
    print(f"predicted: {summary['predicted']}", flush=True)
    print(f"committed run {summary['run_id']} to "
          f"{storage.redact(posixpath.join(output, publish.SCORES_DIR))}", flush=True)
