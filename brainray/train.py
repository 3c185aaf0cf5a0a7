"""The training job: read and split the data, run the TorchTrainer, write the run report.

A run directory (local or s3://) ends up holding: config.json, split.parquet, the Ray Train
checkpoints, model.pt (the best model), metrics.json, predictions.parquet, the PNG plots,
MODEL_CARD.md and report.html.
"""

from __future__ import annotations

import dataclasses
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray.train
from ray.train.torch import TorchTrainer

from brainray import backbones, baseline, calibration, ood, storage
from brainray import metrics as metric_fns
from brainray import split as splitting
from brainray.checkpoint import (
    CONFIG_FILE,
    COVERAGE_PNG,
    MODEL_CARD_FILE,
    MODEL_FILE,
    RELIABILITY_PNG,
    SPLIT_FILE,
    TRAIN_STATE_FILE,
    deserialize,
    model_from_checkpoint,
    read_train_state,
    save_checkpoint,
    tta_of,
    with_fields,
)
from brainray.config import (
    COL_ERROR,
    COL_GROUP,
    COL_LABEL,
    COL_PATH,
    COL_PROBS,
    COL_SHA256,
    COL_SPLIT,
    COL_THUMBNAIL,
    TrainConfig,
    to_dict,
)
from brainray.console import EventPump, Events, console, say
from brainray.data import (
    LabeledData,
    assign_splits,
    load_labeled,
    materialize_splits,
)
from brainray.model import count_parameters
from brainray.model_card import render_model_card
from brainray.predict import predict_labeled, predict_splits
from brainray.report import (
    compute_metrics,
    mistake_gallery,
    predictions_table,
    skipped_files,
    write_html_report,
    write_report,
)
from brainray.tracking import RunTracker
from brainray.train_loop import train_loop_per_worker

# Changing these on a relaunch would silently train a different experiment under the same name.
_RESUME_MUST_MATCH = ("data", "test_data", "classes", "model", "width", "depth", "weights", "seed",
                      "val_fraction", "test_fraction", "dedup_max_hamming",
                      "dedup_min_similarity", "preprocess")
# A config.json written before a field existed ran with that field's default.
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _check_resume(config: TrainConfig) -> None:
    uri = storage.join(config.run_dir, CONFIG_FILE)
    if not storage.exists(uri, config.storage):
        return
    previous = storage.read_json(uri, config.storage)
    current = storage.redact_values(to_dict(config))
    changed = [k for k in _RESUME_MUST_MATCH
               if previous.get(k, _FIELD_DEFAULTS.get(k)) != current.get(k)]
    if changed:
        raise ValueError(f"{storage.redact(config.run_dir)} holds a run with different "
                         f"{', '.join(changed)}; use a new --run-dir or the same settings")
    say(f"resuming the run in {storage.redact(config.run_dir)}")


def _run_config(config: TrainConfig, callbacks: list | None = None) -> ray.train.RunConfig:
    fs, path = storage.resolve(config.run_dir, config.storage)
    parent, name = posixpath.split(path.rstrip("/"))
    return ray.train.RunConfig(
        name=name, storage_path=parent, storage_filesystem=fs, callbacks=callbacks,
        # The latest checkpoint is always kept too (for resume), besides the best by val loss.
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"),
        # Also bounds the retries of a worker group that cannot get its resources (a lost node,
        # no GPU): Ray Train would otherwise wait and retry without end.
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures,
                                               controller_failure_limit=config.max_failures))


def _loop_config(config: TrainConfig, n_train: int, initial_weights=None,
                 initial_weights_source: dict | None = None, events: Events | None = None
                 ) -> dict:
    """The workers' view of the run: the config's fields plus what the driver resolved."""
    return {**to_dict(config), "config": to_dict(config), "n_train": n_train, "events": events,
            "architecture": config.architecture, "initial_weights": initial_weights,
            "initial_weights_source": initial_weights_source}


def prepare_splits(config: TrainConfig) -> tuple[LabeledData, LabeledData | None, pd.DataFrame]:
    classes = list(config.classes)
    labeled = load_labeled(config.data, classes, config.preprocess, config.storage)
    held_out = (load_labeled(config.test_data, classes, config.preprocess, config.storage)
                if config.test_data else None)
    index = assign_splits(labeled.index, config.split_fractions, config.seed,
                          config.dedup_max_hamming, held_out.index if held_out else None,
                          config.dedup_min_similarity)
    return labeled, held_out, index


def _split_summary(index: pd.DataFrame, classes: list[str]) -> dict:
    summary = splitting.split_report(index[COL_LABEL].to_numpy(), index[COL_GROUP].to_numpy(),
                                     index[COL_SPLIT].to_numpy(), classes)
    summary["method"] = ("exact duplicates (same sha256) and near-duplicates (perceptual dHash "
                         "within the Hamming distance) are grouped; whole groups are assigned to "
                         "one split, stratified by class")
    return summary


def _print_split(summary: dict) -> None:
    say(f"split: {summary['n_images']} images in {summary['n_groups']} groups; "
          f"{summary['n_duplicate_groups']} duplicate groups hold "
          f"{summary['n_images_in_duplicate_groups']} images and are kept within one split")
    for name, counts in summary["counts"].items():
        say(f"  {name:>22}: {sum(counts.values()):5d}  {counts}")


def baseline_metrics(train_index: pd.DataFrame, test_index: pd.DataFrame,
                     classes: list[str]) -> dict:
    """The 1-nearest-neighbour thumbnail baseline on the same split: what memory alone scores."""
    predicted = baseline.nearest_neighbour_predict(
        np.stack(train_index[COL_THUMBNAIL].to_numpy()), train_index[COL_LABEL].to_numpy(),
        np.stack(test_index[COL_THUMBNAIL].to_numpy()))
    one_hot = np.eye(len(classes))[predicted]
    full = metric_fns.classification_metrics(test_index[COL_LABEL].to_numpy(), one_hot, classes)
    return {"method": "1-nearest-neighbour on 32x32 grayscale thumbnails of the train split",
            **{k: full[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "n_images")}}


def _checkpoint_file(checkpoint, name: str) -> str:
    return storage.join(storage.to_uri(checkpoint.filesystem, checkpoint.path), name)


def _best_model(result, config: TrainConfig) -> tuple[dict, dict]:
    """Copy the best checkpoint's model to run_dir/model.pt; return it and the loop's state.

    Only the two files needed are read: downloading the whole latest checkpoint (weights and
    optimizer state) just for its small train_state.pt would triple the S3 traffic.
    """
    best_uri = _checkpoint_file(result.get_best_checkpoint(metric="val_loss", mode="min"),
                                MODEL_FILE)
    model_bytes = storage.read_bytes(best_uri, config.storage)
    storage.write_bytes(storage.join(config.run_dir, MODEL_FILE), model_bytes, config.storage)
    state_bytes = storage.read_bytes(_checkpoint_file(result.checkpoint, TRAIN_STATE_FILE),
                                     config.storage)
    state = read_train_state(state_bytes)
    return deserialize(model_bytes, source=best_uri), state["loop_state"]


def _calibrate_and_guard(config: TrainConfig, splits: dict, val_predictions: pd.DataFrame,
                         predictions: pd.DataFrame, checkpoint: dict
                         ) -> tuple[pd.DataFrame, dict, dict, dict[str, bytes]]:
    """Temperature scaling and the review threshold (fitted on validation, reported on test) and
    the OOD reference (training images); model.pt is rewritten with them, same model_id. Also
    returns the reliability and coverage PNGs written, by file name.

    A failure here is reported in metrics.json and leaves the uncalibrated model in place: it
    never throws away a finished training run.
    """
    options, model_uri = config.storage, storage.join(config.run_dir, MODEL_FILE)
    fields, report, figures = {}, {}, {}
    try:
        result = calibration.calibrate_run(val_predictions, predictions, config.target_accuracy)
        predictions = result.test_predictions
        report.update(result.report)
        fields.update(temperature=result.temperature, review_threshold=result.review_threshold,
                      calibration=result.report)
        figures = {RELIABILITY_PNG: result.reliability_png, COVERAGE_PNG: result.coverage_png}
        for name, png in figures.items():
            storage.write_bytes(storage.join(config.run_dir, name), png, options)
        cal, abst = result.report["calibration"], result.report["abstention"]
        say(f"calibration: temperature {cal['temperature']:.3f}; test ECE "
              f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}, NLL {cal['nll_before']:.4f} "
              f"-> {cal['nll_after']:.4f}; review threshold {abst['threshold']:.3f} (target "
              f"accuracy {abst['target_accuracy']}: test coverage {abst['test_coverage']:.1%})")
    except Exception as exc:
        report["calibration"] = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"warning: calibration failed, the model stays uncalibrated: {exc}")
    try:
        fields["ood_reference"] = ood.reference_from_dataset(
            splits["train"])
        report["ood_reference"] = fields["ood_reference"]
    except Exception as exc:
        say(f"warning: no OOD reference from the training images: {exc}")
    if fields:
        checkpoint = with_fields(checkpoint, **fields)
        save_checkpoint(model_uri, checkpoint, options)
    return predictions, checkpoint, report, figures


def _initial_weights(config: TrainConfig) -> tuple[object | None, dict | None]:
    """The pretrained weights (`--weights`), checked against the architecture on the driver so
    that a wrong file fails before any data is read, and put once into the object store for the
    workers; with their provenance (source and SHA-256) for the checkpoint."""
    if config.weights is None:
        return None, None
    state_dict, provenance = backbones.initial_weights(
        config.weights, config.model, lambda uri: storage.read_bytes(uri, config.storage))
    say(f"initial weights: {provenance['source']} (sha256 {provenance['sha256'][:16]}...)")
    return ray.put(state_dict), provenance


def _start(config: TrainConfig) -> None:
    """Print and save the resolved config; refuse a relaunch that changes the experiment."""
    overrides = config.recipe_overrides()
    say(f"brainray train: recipe {config.recipe}"
          + (f", overridden: {overrides}" if overrides else "") + "\n"
          + storage.redacted_json(config))
    storage.ensure_writable(config.run_dir, config.storage)
    _check_resume(config)
    storage.write_text(storage.join(config.run_dir, CONFIG_FILE), storage.redacted_json(config),
                       config.storage)


def _split_paths(index: pd.DataFrame, has_held_out: bool) -> dict[str, pd.Series]:
    paths = {name: index.loc[index[COL_SPLIT] == name, COL_PATH] for name in ("train", "val",
                                                                            "test")}
    if min(len(paths["train"]), len(paths["val"])) == 0:
        raise ValueError("too few usable images to make non-empty train and validation splits")
    if not has_held_out and len(paths["test"]) == 0:
        raise ValueError("too few usable images to make a non-empty test split")
    return paths


def epoch_line(metrics: dict, epochs: int, eta_s: float) -> str:
    return (f"epoch {metrics['epoch']}/{epochs}  "
            f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f}  |  "
            f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.4f}  |  "
            f"{metrics['images_per_s']:.1f} img/s (waiting for data "
            f"{metrics['input_wait_fraction']:.0%})  lr {metrics['lr']:.2e}  "
            f"ETA {eta_s / 60:.1f} min (at most)")


def _training_events(config: TrainConfig, n_train: int, tracker: RunTracker):
    """What the driver does with rank 0's events: lines, a bar per epoch on a terminal, and
    each epoch's line and tracking."""
    out = console()

    def handle(kind: str, payload) -> None:
        if kind == "line":
            out.line(payload)
        elif kind == "progress":
            out.progress(payload["images"], n_train, f"epoch {payload['epoch']}/{config.epochs}",
                         f"loss {payload['loss']:.4f}, {payload['images_per_s']:.0f} img/s")
        elif kind == "epoch":
            out.close_bar()
            out.line(epoch_line(payload["metrics"], payload["epochs"], payload["eta_s"]))
            tracker.epoch(payload["metrics"])
    return handle


def _fit(config: TrainConfig, splits: dict, n_train: int, initial_weights,
         callbacks: list | None, tracker: RunTracker) -> tuple:
    """Run the TorchTrainer, showing its progress; the result and its wall time in seconds."""
    events = Events()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(config, n_train, *initial_weights, events=events),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker,
                                  **({"GPU": config.gpus_per_worker} if config.use_gpu else {})},
            placement_strategy=config.placement_strategy),
        run_config=_run_config(config, callbacks),
        datasets={"train": splits["train"], "val": splits["val"]},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    started = time.perf_counter()
    try:
        with EventPump(events, _training_events(config, n_train, tracker)):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        _raise_if_no_resources(exc, config)
        raise
    finally:
        events.shutdown()
    return result, time.perf_counter() - started


def _raise_if_no_resources(exc: Exception, config: TrainConfig) -> None:
    """Ray Train's "worker group startup timed out" as what it means for this run."""
    if "WorkerGroupStartupTimeoutError" not in repr(exc) and "timed out" not in str(exc).lower():
        return
    need = (f"{config.num_workers} worker(s) x {config.cpus_per_worker:g} CPU"
            + (" + 1 GPU" if config.use_gpu else "")
            + (f", {config.placement_strategy}" if config.placement_strategy != "PACK" else ""))
    raise RuntimeError(
        f"the training workers could not get their resources ({need}) within "
        f"{config.resource_wait_s:g} s, {config.max_failures + 1} time(s): the cluster has no "
        "room for them (a lost node, GPU nodes that did not start?); the run can be resumed "
        "with the same --run-dir once it has") from exc


def _test_set(config: TrainConfig, held_out: LabeledData | None, index: pd.DataFrame,
              splits: dict) -> tuple:
    """The test images as a dataset (and the paths to select from it) and their index rows."""
    if held_out is None:
        return splits["test"], None, index[index[COL_SPLIT] == "test"]
    usable = held_out.index[held_out.index[COL_ERROR] == ""]
    return held_out.dataset, usable[COL_PATH], usable


def _without_tta(config: TrainConfig, source, paths, classes: list[str]) -> dict | None:
    """Test figures of the same (calibrated) model without its test-time augmentation: what
    TTA adds."""
    if config.tta == "none":
        return None
    plain = predict_labeled(source, paths, storage.join(config.run_dir, MODEL_FILE),
                            config.storage, use_gpu=config.use_gpu, tta="none")
    full = compute_metrics(plain, classes)
    return {k: full[k] for k in ("accuracy", "accuracy_ci95", "macro_f1", "loss")}


def near_duplicates(train_index: pd.DataFrame, test_index: pd.DataFrame) -> dict:
    similarity = baseline.nearest_similarity(np.stack(train_index[COL_THUMBNAIL].to_numpy()),
                                             np.stack(test_index[COL_THUMBNAIL].to_numpy()))
    return baseline.leakage_summary(similarity)


def _distinct_images(predictions: pd.DataFrame, test_index: pd.DataFrame,
                     classes: list[str]) -> dict | None:
    """Test metrics over distinct images (brainray.metrics.distinct_image_metrics); None for a
    held-out test set, which is not grouped."""
    if COL_GROUP not in test_index:
        return None
    rows = predictions[[COL_PATH, COL_LABEL, COL_PROBS]].merge(
        test_index[[COL_PATH, COL_GROUP]], on=COL_PATH).sort_values(COL_PATH)
    predicted = np.stack(rows[COL_PROBS].to_numpy()).argmax(1)
    return metric_fns.distinct_image_metrics(rows[COL_LABEL].to_numpy(), predicted,
                                             rows[COL_GROUP].to_numpy(), classes)


@dataclass
class PreparedData:
    """The run's data after decoding and splitting: what training and the report need."""

    labeled: LabeledData  # the index only, once split
    held_out: LabeledData | None
    index: pd.DataFrame
    split_summary: dict
    paths: dict[str, pd.Series]
    splits: dict[str, ray.data.Dataset]


def _prepare_data(config: TrainConfig) -> PreparedData:
    """Decode, fingerprint and split the data; write split.parquet; materialize the splits."""
    labeled, held_out, index = prepare_splits(config)
    split_summary = _split_summary(index, list(config.classes))
    _print_split(split_summary)
    storage.write_bytes(storage.join(config.run_dir, SPLIT_FILE), index[
        [COL_PATH, COL_LABEL, COL_SHA256, COL_GROUP, COL_SPLIT]].to_parquet(index=False),
        config.storage)
    paths = _split_paths(index, held_out is not None)
    splits = materialize_splits(labeled.dataset, paths, config.seed)
    return PreparedData(LabeledData(dataset=None, index=labeled.index),  # frees the unsplit copy
                        held_out, index, split_summary, paths, splits)


def _test_report(config: TrainConfig, data: PreparedData, result, wall_s: float) -> dict:
    """The best model on the test split, calibrated, beside the baseline; the run's report."""
    classes = list(config.classes)
    checkpoint, loop_state = _best_model(result, config)
    test_source, test_paths, test_index = _test_set(config, data.held_out, data.index,
                                                    data.splits)
    predicted = predict_splits({"val": (data.splits["val"], None),
                                "test": (test_source, test_paths)},
                               storage.join(config.run_dir, MODEL_FILE), config.storage,
                               use_gpu=config.use_gpu)
    predictions, checkpoint, trust_report, trust_figures = _calibrate_and_guard(
        config, data.splits, predicted["val"], predicted["test"], checkpoint)
    train_index = data.index[data.index[COL_SPLIT] == "train"]
    report = _report(config, checkpoint, loop_state, wall_s, {
        **compute_metrics(predictions, classes),
        "baseline_1nn": baseline_metrics(train_index, test_index, classes),
        "near_duplicates": near_duplicates(train_index, test_index),
        "distinct_images": _distinct_images(predictions, test_index, classes),
        "without_tta": _without_tta(config, test_source, test_paths, classes),
        "split": data.split_summary,
        "skipped_files": skipped_files(data.labeled.index) + (
            skipped_files(data.held_out.index) if data.held_out is not None else []),
        **trust_report})
    figures = write_report(config.run_dir, report, config.storage,
                           predictions_table(predictions, classes), report["history"])
    storage.write_text(storage.join(config.run_dir, MODEL_CARD_FILE), render_model_card(report),
                       config.storage)
    write_html_report(config.run_dir, report, {**figures, **trust_figures}, config.storage,
                      mistake_gallery(test_source, predictions, checkpoint))
    return report


def run_training(config: TrainConfig, callbacks: list | None = None) -> dict:
    """`brainray train`; `callbacks` (Ray Train user callbacks) see every epoch's report, as
    Ray Tune's does when a search runs this as a trial."""
    _start(config)
    initial_weights = _initial_weights(config)
    data = _prepare_data(config)
    with RunTracker(config) as tracker:
        result, wall_s = _fit(config, data.splits, len(data.paths["train"]), initial_weights,
                              callbacks, tracker)
        report = _test_report(config, data, result, wall_s)
        tracker.finish(report)
    _print_summary(report, config)
    return report


def _report(config: TrainConfig, checkpoint: dict, loop_state: dict, wall_s: float,
            results: dict) -> dict:
    history = loop_state["history"]
    images_trained = sum(h["train_images"] for h in history)
    return {
        **results,
        "model_name": config.model, "model_id": checkpoint["model_id"],
        "architecture": checkpoint.get("architecture", {}),
        "initial_weights": checkpoint.get("initial_weights"),
        "test_time_augmentation": tta_of(checkpoint),
        "n_parameters": count_parameters(model_from_checkpoint(checkpoint)),
        "best_epoch": checkpoint["epoch"], "history": history,
        "resumed_at_epochs": loop_state.get("resumed_at_epochs", []),
        "training_wall_s": wall_s,
        "training_images_per_s": images_trained / max(sum(h["train_seconds"] for h in history),
                                                      1e-9),
        "recipe": config.recipe, "recipe_overrides": config.recipe_overrides(),
        "config": to_dict(config),
    }


def _print_summary(report: dict, config: TrainConfig) -> None:
    nn_baseline, leakage = report["baseline_1nn"], report["near_duplicates"]
    say(f"test set ({report['n_images']} images, best epoch {report['best_epoch']}):\n"
          + metric_fns.format_summary(report))
    if report["without_tta"]:
        say(f"without test-time augmentation: accuracy {report['without_tta']['accuracy']:.4f}")
    if report["distinct_images"]:
        distinct = report["distinct_images"]
        say(f"distinct test images (each duplicate group once): {distinct['n_images']}, accuracy "
            f"{distinct['accuracy']:.4f} (95% CI {distinct['accuracy_ci95'][0]:.4f}-"
            f"{distinct['accuracy_ci95'][1]:.4f})")
    say(f"trivial baseline (1-NN on thumbnails, same split): accuracy "
          f"{nn_baseline['accuracy']:.4f}, macro F1 {nn_baseline['macro_f1']:.4f}; test images "
          f"whose nearest training thumbnail is > 0.95 / > 0.99 similar: "
          f"{leakage['share_above_0.95']:.1%} / {leakage['share_above_0.99']:.1%}")
    if report["skipped_files"]:
        say(f"skipped {len(report['skipped_files'])} unreadable file(s), listed in metrics.json:")
        for item in report["skipped_files"][:10]:
            say(f"  {item['path']}: {item['error']}")
    say(f"run written to {storage.redact(config.run_dir)}")
