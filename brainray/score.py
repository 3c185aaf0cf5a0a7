"""The batch scoring job: archives in, one Parquet row per image (or DICOM frame) out, exactly once.

CPU tasks read files and expand archives/DICOM into images with the checkpoint's preprocessing; an
actor pool (one model per actor, a GPU each when the cluster has them) scores them; rows are staged
and committed atomically by `brainray.publish`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import posixpath
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import numpy as np
import ray.data
import torch

from brainray import lease, ood, publish, scored_index, storage
from brainray.checkpoint import (
    load_checkpoint,
    locate_checkpoint,
    review_threshold_of,
)
from brainray.config import ScoreConfig, StorageOptions
from brainray.console import EventPump, Events, console, say
from brainray.data import storage_errors_raised
from brainray.explain import ReviewOverlays
from brainray.predict import Predictor
from brainray.presets import InferencePreset
from brainray.unpack import (
    INDEX,
    INPUT,
    SourceImage,
    SourceLimits,
    expand,
    identify,
    is_archive,
    needs_random_access,
    probe_bytes,
)

IMAGES_PER_BLOCK = 64  # bounds memory when one archive expands into thousands of images
# Decoding runs in CPU tasks of their own beside the actors (a 1-CPU actor leaves room for two),
# on CPU and GPU clusters alike. A CPU request unlike the actors' keeps Ray Data from fusing the
# two steps, so the next batches decode while the model runs: on 2 cores, 3,000-image jobs took
# 27.7 / 27.1 s this way against 36.0 / 30.4 s fused into the actor (bench/scoring.py).
READ_TASK_CPUS = 0.5
# Shaping rows into the published schema is light; a small request lets it run beside the rest.
SHAPE_TASK_CPUS = 0.25


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


# Files whose name does not say what they are have their first bytes read, this many at once: on
# S3 each is a round trip, and a PACS export names every DICOM file IM0001 or by UID.
_PROBE_THREADS = 32
_PROBE_CHUNK = 10_000  # files handed to the threads at a time (bounds the futures held)


@dataclass(frozen=True)
class InputListing:
    """What listing the inputs found."""

    files: list[dict]  # to score: uri, size, mtime_ns; sorted by URI
    dicomdirs: list[str]  # DICOMDIRs set aside: the index of a DICOM file-set, not an image
    already_scored: int = 0  # files skipped as scored by this model before


def list_inputs(inputs: tuple[str, ...], options: StorageOptions,
                scored: frozenset | set = frozenset()) -> InputListing:
    """Every input file under the input URIs, with size and mtime, except those whose
    (uri, size, mtime_ns) is in `scored`. The extension says what a file is; a file without a
    known one has its first 132 bytes read and is DICOM when they hold the DICM marker."""
    listed = _listed(inputs, options)
    new = [f for f in listed if (display_uri(f["uri"]), f["size"], f["mtime_ns"]) not in scored]
    kinds = _identify_all(new, options)
    return InputListing(files=[f for f, kind in zip(new, kinds, strict=True) if kind == INPUT],
                        dicomdirs=[f["uri"] for f, kind in zip(new, kinds, strict=True)
                                   if kind == INDEX],
                        already_scored=len(listed) - len(new))


def _listed(inputs: tuple[str, ...], options: StorageOptions) -> list[dict]:
    """Every file under the input URIs (metadata only), once, sorted by URI."""
    found: dict[str, dict] = {}
    for uri in inputs:
        try:
            entries = storage.list_files(uri, options)
        except storage.StorageError as exc:
            raise type(exc)(f"input {exc}") from exc
        for entry in entries:
            found[entry.uri] = {"uri": entry.uri, "size": entry.size, "mtime_ns": entry.mtime_ns}
    return [found[k] for k in sorted(found)]


def _identify_all(files: list[dict], options: StorageOptions) -> list[str | None]:
    """What each file is (unpack.INPUT, INDEX or None), by name, or by its first bytes when the
    name does not tell."""
    kinds: list[str | None] = [INPUT] * len(files)
    unnamed = [i for i, f in enumerate(files) if probe_bytes(f["uri"])]
    if not unnamed:
        return kinds
    with ThreadPoolExecutor(_PROBE_THREADS) as pool:
        for start in range(0, len(unnamed), _PROBE_CHUNK):
            chunk = unnamed[start:start + _PROBE_CHUNK]
            probed = pool.map(lambda i: _probe(files[i]["uri"], options), chunk)
            for i, kind in zip(chunk, probed, strict=True):
                kinds[i] = kind
    return kinds


def _probe(uri: str, options: StorageOptions) -> str | None:
    try:
        head = storage.read_head(uri, probe_bytes(uri), options)
    except storage.TransientStorageError:
        raise
    except storage.StorageError:
        return INPUT  # unreadable (permissions, vanished): the read step records why
    return identify(uri, head)


_ROW_COLUMNS = (publish.COL_URI, publish.COL_MEMBER, publish.COL_FRAME, publish.COL_SHA256,
                publish.COL_STATUS, publish.COL_ERROR, publish.COL_SOURCE_SIZE,
                publish.COL_SOURCE_MTIME, *publish.DICOM_COLUMNS, "image", "colour")


def _empty_rows() -> dict[str, list]:
    return {k: [] for k in _ROW_COLUMNS}


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
                        preset: InferencePreset, limits: SourceLimits, max_file_bytes: int,
                        events: Events | None = None):
    """Input files -> blocks of preprocessed images, one row per image; failures become rows.
    Files expand lazily, so a task holds one block and one decoded image however many images
    an archive holds. With `events`, each block tells the driver how many more files are done."""
    image_size = preset.preprocess.image_size
    rows, files_done = _empty_rows(), 0
    for uri, size, mtime in zip(batch["uri"], batch["size"], batch["mtime_ns"], strict=True):
        source = (display_uri(uri), int(size), int(mtime))
        for item in _source_images(uri, int(size), options, limits, max_file_bytes, events):
            _add_row(rows, source, item, preset)
            if len(rows[publish.COL_URI]) >= IMAGES_PER_BLOCK:
                _send_files(events, files_done)
                files_done = 0
                yield _to_block(rows, image_size)
                rows = _empty_rows()
        files_done += 1
    _send_files(events, files_done)
    if rows[publish.COL_URI]:
        yield _to_block(rows, image_size)


def _source_images(uri: str, size: int, options: StorageOptions, limits: SourceLimits,
                   max_file_bytes: int, events: Events | None) -> Iterator[SourceImage]:
    """The file's images as they are decoded. An archive is streamed, so only other files are
    held to `max_file_bytes`; the archive limits bound what an archive expands into."""
    if size > max_file_bytes and not is_archive(uri):
        yield _file_failure(f"file is {size} bytes, over the limit of {max_file_bytes}")
        return
    found = False
    try:
        with _open_input(uri, options) as source:
            for item in expand(uri, source, limits):
                found = True
                yield item
    except storage.TransientStorageError:
        # Storage down or throttling past the retries: fail the job (nothing is committed; the
        # next run retries) rather than record the file as scored.
        raise
    except storage.StorageError as exc:
        reason = _valid_utf8(str(exc))
        if not found:
            # Unreadable now (vanished since listing, permission denied) is not a property of
            # the image: no row, so the next incremental run tries the file again.
            _send_retry(events, display_uri(uri), reason)
            return
        # Part of a streamed archive is already in rows (perhaps in blocks sent on), and any
        # row marks the file scored in the index: say that the rest is missing. A file replaced
        # while read has a new size or mtime, so the next run scores it again anyway.
        yield _file_failure(f"read failed part-way, after the rows before this one: {reason}")
        return
    if not found:  # an archive with no images
        yield _file_failure("no images found in file")


def _open_input(uri: str, options: StorageOptions) -> IO[bytes]:
    """Archives are streamed (a zip over ranged reads: its directory is at its end); a plain
    image or DICOM file is one image, read whole."""
    if not is_archive(uri):
        return io.BytesIO(storage.read_bytes(uri, options))
    if needs_random_access(uri):
        return storage.open_seekable(uri, options)
    return storage.open_stream(uri, options)


def _file_failure(reason: str) -> SourceImage:
    return SourceImage(member=None, frame=None, image=None, content_sha256="", error=reason)


def _add_row(rows: dict[str, list], source: tuple[str, int, int], item: SourceImage,
             preset: InferencePreset) -> None:
    """One image (or failure) as a row: the checkpoint's preprocessing applied, the decoded
    image dropped."""
    error, colour, pixels = item.error, 0.0, None
    if not error:
        try:
            pixels, colour = preset.image(item.image)
        except (OSError, ValueError) as exc:
            error = f"cannot preprocess image: {exc}"
    if pixels is None:
        size = preset.preprocess.image_size
        pixels = np.zeros((size, size), np.uint8)
    uri, size_bytes, mtime = source
    status = publish.STATUS_ERROR if error else publish.STATUS_OK
    # content_sha256 is null when the bytes were not read (refused member, unreadable file)
    values = (uri, item.member, item.frame, item.content_sha256 or None, status, error or None,
              size_bytes, mtime,
              *(getattr(item.dicom, column) if item.dicom else None
                for column in publish.DICOM_COLUMNS),
              pixels, colour)
    for key, value in zip(_ROW_COLUMNS, values, strict=True):
        rows[key].append(value)


def _send_files(events: Events | None, files: int) -> None:
    if events is not None and files:
        events.send("files", files)


def _send_retry(events: Events | None, uri: str, reason: str) -> None:
    if events is not None:
        events.send("retry", {"uri": uri, "reason": reason})


class Scorer:
    """One model per actor: per image of a block, the class probabilities, the review flag and
    the out-of-distribution verdict (error rows pass through unscored). Output shaping
    (`publish.output_table`) and review overlays (`explain.ReviewOverlays`) are later steps."""

    def __init__(self, model_uri: str, options: StorageOptions, use_gpu: bool,
                 threshold: float | None, threads: int = 0, concurrency: int = 1,
                 ood_check: bool = True, keep_images: bool = False,
                 events: Events | None = None):
        if not use_gpu:
            torch.set_num_threads(actor_threads(threads, concurrency))
        self.predictor = Predictor(model_uri, options, use_gpu=use_gpu)
        # None: the review threshold stored in the checkpoint (chosen on validation), else 0.7
        self.threshold = review_threshold_of(
            {"review_threshold": self.predictor.review_threshold}, threshold)
        self.ood_check = ood_check
        self.keep_images = keep_images  # the overlay step needs them
        self.events = events

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[publish.COL_URI])
        ok = np.array([s == publish.STATUS_OK for s in batch[publish.COL_STATUS]], dtype=bool)
        probs = np.full((n, len(self.predictor.classes)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.predictor.predict(batch["image"][ok])
        flags, reasons = np.zeros(n, dtype=bool), np.full(n, "", dtype=object)
        if self.ood_check and ok.any():
            flags[ok], reasons[ok] = ood.decide(
                {name: np.asarray(batch[column], dtype=np.float64)[ok]
                 for name, column in OOD_COLUMNS.items()}, self.predictor.ood_reference)
        confidence = np.nan_to_num(probs, nan=0.0).max(1)
        review = ok & ((confidence < self.threshold) | flags)
        if self.events is not None:
            self.events.send("scored", {"rows": n, "errors": int(n - ok.sum())})
        dropped = {*OOD_COLUMNS.values(), *(() if self.keep_images else ("image",))}
        return {**{k: v for k, v in batch.items() if k not in dropped},
                publish.COL_PROBS: probs, publish.COL_NEEDS_REVIEW: review,
                # not checked is not "in distribution": null, not false
                publish.COL_OOD: flags if self.ood_check else np.full(n, None, dtype=object),
                publish.COL_OOD_REASON: reasons}


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


def actor_threads(threads_per_actor: int, concurrency: int) -> int:
    """Torch threads of a CPU scoring actor: as given, else its own node's cores shared among
    the actors (read in the actor, on the node that runs it: the driver of a `ray job submit`
    runs on the head, whose cores say nothing about the worker nodes')."""
    cores = os.cpu_count() or 1
    return threads_per_actor or max(1, cores // max(1, min(concurrency, cores)))


class ScoringProgress:
    """The driver's view of a scoring run from the tasks' and actors' events: a bar over the
    files on a terminal, a line at most every 30 s elsewhere."""

    def __init__(self, n_files: int):
        self.n_files, self.files, self.rows, self.errors = n_files, 0, 0, 0
        self.retries: list[dict] = []  # files unreadable now: not scored, the next run retries
        self.started = time.perf_counter()

    def __call__(self, kind: str, payload) -> None:
        if kind == "files":
            self.files += payload
        elif kind == "retry":
            self.retries.append(payload)
        elif kind == "scored":
            self.rows += payload["rows"]
            self.errors += payload["errors"]
        console().progress(self.files, self.n_files, "scoring",
                           f"{self.rows:,} images, {self.errors:,} errors, "
                           f"{self._rate():.0f} img/s", plain=self.plain)

    def _rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.started, 1e-9)

    def plain(self) -> str:
        elapsed = time.perf_counter() - self.started
        left = self.n_files - self.files
        eta = f"{elapsed / self.files * left / 60:.1f} min" if self.files else "unknown"
        return (f"  scored {self.rows:,} image(s) from {self.files:,}/{self.n_files:,} "
                f"file(s), {self.errors:,} error(s), {self._rate():.0f} img/s, ETA {eta}")


def _review_threshold(config: ScoreConfig, checkpoint: dict) -> float:
    threshold = review_threshold_of(checkpoint, config.confidence_threshold)
    say(f"needs_review below confidence {threshold:.3f} ("
          + ("--confidence-threshold" if config.confidence_threshold is not None else
             "the checkpoint's review threshold" if "review_threshold" in checkpoint else
             "default") + ")")
    return threshold


def scoring_key(model_id: str, threshold: float, ood_check: bool) -> str:
    """What identifies the rows a run writes: the model (its weights, calibration, guards and
    preprocessing: brainray.checkpoint.model_identity) and the run's own settings that change a
    row. Inputs scored under another key are scored again."""
    text = json.dumps({"model_id": model_id, "review_threshold": round(float(threshold), 6),
                       "ood_check": bool(ood_check), "schema": publish.SCHEMA_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _files_to_score(config: ScoreConfig, key: str) -> InputListing:
    """The inputs' files not yet scored under this key (all with --rescore); from the output's
    index (one small file, whatever the history)."""
    scored = (scored_index.scored(config.output,
                                  publish.current_index(config.output, config.storage),
                                  key, config.storage)
              if config.incremental else frozenset())
    return list_inputs(config.inputs, config.storage, scored)


def _scored(config: ScoreConfig, files: list[dict], checkpoint: dict, model_uri: str,
            threshold: float, run_id: str, events: Events) -> ray.data.Dataset:
    """The lazy pipeline: read + preprocess tasks, the scoring actors, review overlays (with
    --explain-review-dir), and rows in the published schema."""
    options = config.storage
    scored = (
        ray.data.from_items(files)
        .map_batches(read_and_preprocess, batch_size=_files_per_task(config),
                     num_cpus=READ_TASK_CPUS, fn_kwargs={
                         "options": options, "preset": InferencePreset.of(checkpoint),
                         "limits": SourceLimits(
                             max_image_pixels=checkpoint["preprocess"]["max_image_pixels"]),
                         "max_file_bytes": config.max_file_bytes, "events": events})
        .map_batches(Scorer, batch_size=config.batch_size,
                     fn_constructor_kwargs={
                         "model_uri": model_uri, "options": options, "use_gpu": config.use_gpu,
                         "threshold": threshold, "threads": config.threads_per_actor,
                         "concurrency": config.concurrency,
                         "ood_check": config.ood_check,
                         "keep_images": config.explain_review_dir is not None,
                         "events": events},
                     compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                     num_gpus=config.num_gpus_per_actor if config.use_gpu else 0,
                     **_scorer_remote_args(config)))
    if config.explain_review_dir is not None:
        scored = scored.map_batches(
            ReviewOverlays, fn_constructor_kwargs={
                "model_uri": model_uri, "output": config.explain_review_dir,
                "options": options, "use_gpu": config.use_gpu},
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=READ_TASK_CPUS,
            num_gpus=config.num_gpus_per_actor if config.use_gpu else 0)
    return scored.map_batches(publish.output_table, num_cpus=SHAPE_TASK_CPUS, fn_kwargs={
        "classes": checkpoint["classes"], "model_id": checkpoint["model_id"],
        "model_name": checkpoint["model_name"], "run_id": run_id})


def _write_staged(scored: ray.data.Dataset, staging: str, config: ScoreConfig) -> None:
    """Write the run's rows to its staging folder; a storage outage in a task fails the job with
    its own one-line reason."""
    fs, staging_path = storage.resolve(staging, config.storage)
    with storage_errors_raised():
        scored.write_parquet(staging_path, filesystem=fs, min_rows_per_file=config.rows_per_file)


def _score_files(config: ScoreConfig, files: list[dict], checkpoint: dict, model_uri: str,
                 threshold: float, run_id: str) -> tuple[float, list[dict]]:
    """Score the files into the run's staging folder: its wall time and the files to retry."""
    started = time.perf_counter()
    events, progress = Events(), ScoringProgress(len(files))
    try:
        with EventPump(events, progress):
            _write_staged(_scored(config, files, checkpoint, model_uri, threshold, run_id,
                                  events), publish.staging_uri(config.output, run_id), config)
    finally:
        events.shutdown()
    return time.perf_counter() - started, progress.retries


def _commit_run(config: ScoreConfig, held: lease.Held, run_id: str, summary: dict) -> None:
    publish.mark_ready(config.output, run_id, summary, config.storage)
    held.check()  # a run that lost its lease (presumed dead) must not commit
    for warning in publish.commit(config.output, run_id, config.storage):
        say(warning)


def run_scoring(config: ScoreConfig) -> dict:
    say("brainray score\n" + storage.redacted_json(config))
    options = config.storage
    storage.ensure_writable(config.output, options)
    model_uri = locate_checkpoint(config.model, options)
    checkpoint = load_checkpoint(model_uri, options)
    model_id, threshold = checkpoint["model_id"], _review_threshold(config, checkpoint)
    key = scoring_key(model_id, threshold, config.ood_check)
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    with lease.Held(config.output, run_id, options, config.lease_ttl_s) as held:
        # before recovery, so that an output another version or model wrote is left untouched
        publish.check_compatible(config.output, checkpoint["classes"], options)
        for line in publish.recover(config.output, options):
            say(line)
        listing = _files_to_score(config, key)
        files, skipped = listing.files, {"skipped_files": listing.already_scored,
                                         "skipped_dicomdirs": len(listing.dicomdirs)}
        say(f"{len(files)} file(s) to score with model {checkpoint['model_name']} ({model_id}); "
            f"{listing.already_scored} already scored with these settings; "
            f"{len(listing.dicomdirs)} DICOMDIR(s) skipped (the index of a DICOM file-set, "
            "not an image)")
        if not files:
            return {"images": 0, "files": 0, **skipped, "model_id": model_id}
        wall_s, retries = _score_files(config, files, checkpoint, model_uri, threshold, run_id)
        summary = {**publish.summarize(publish.staging_uri(config.output, run_id), options,
                                       threshold), "files": len(files), **skipped,
                   "model_id": model_id, "scoring_key": key, "classes": checkpoint["classes"],
                   "run_id": run_id, "wall_s": wall_s, "retry_next_run": retries}
        summary["images_per_s"] = summary["images"] / max(wall_s, 1e-9)
        _commit_run(config, held, run_id, summary)
    _print_summary(summary, config.output)
    return summary


def _print_summary(summary: dict, output: str) -> None:
    say(f"scored {summary['images']} image(s) from {summary['files']} file(s) in "
        f"{summary['wall_s']:.1f} s ({summary['images_per_s']:.1f} images/s): "
        f"{summary['ok']} ok, {summary['errors']} error(s), {summary['needs_review']} to "
        f"review (confidence below {summary['confidence_threshold']:.3f} or out of "
        f"distribution: {summary['out_of_distribution']})")
    say(f"predicted: {summary['predicted']}")
    if summary["skipped_dicomdirs"]:
        say(f"skipped {summary['skipped_dicomdirs']} DICOMDIR(s): the index of a DICOM "
            "file-set, not an image")
    say(f"committed run {summary['run_id']} to "
        f"{storage.redact(posixpath.join(output, publish.SCORES_DIR))}")
    retries = summary["retry_next_run"]
    if retries:
        say(f"{len(retries)} file(s) could not be read now and are not scored; the next run "
            "tries them again:")
        for item in retries[:10]:
            say(f"  {item['uri']}: {item['reason']}")
