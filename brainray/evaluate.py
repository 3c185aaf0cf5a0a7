"""Evaluate a checkpoint on labeled data with Ray Data batch inference; write metrics and plots.

Shared by `brainray evaluate` and the test-set report at the end of training, so both produce the
same metrics.json and PNGs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import ray.data

from brainray import metrics as metric_fns
from brainray import storage
from brainray.config import (
    COL_ERROR,
    COL_IMAGE,
    COL_LABEL,
    COL_PATH,
    EvalConfig,
    StorageOptions,
    to_dict,
)
from brainray.data import load_labeled, select_rows
from brainray.model import preprocess_config, temperature_of
from brainray.predict import COL_PROBS, Predictor, load_checkpoint, resolve_checkpoint_uri


def predict_labeled(dataset: ray.data.Dataset, paths, model_uri: str, options: StorageOptions,
                    batch_size: int = 64, num_actors: int = 1,
                    use_gpu: bool = False, tta: str | None = None) -> pd.DataFrame:
    """Per-image path, true label and class probabilities (small: the images stay in Ray).

    `tta` overrides the checkpoint's test-time augmentation ("none" or "hflip").

    `paths=None` scores every row of `dataset`, which must hold just path, image and label (a
    split from `materialize_splits`): filtering it again would copy every image once more.
    """
    rows = dataset if paths is None else select_rows(dataset, paths,
                                                     columns=(COL_PATH, COL_IMAGE, COL_LABEL))
    predicted = rows.map_batches(
        Predictor, batch_size=batch_size,
        fn_constructor_kwargs={"model_uri": model_uri, "options": options, "use_gpu": use_gpu,
                               "tta": tta},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=1 if use_gpu else 0)
    frame = predicted.select_columns([COL_PATH, COL_LABEL, COL_PROBS]).to_pandas()
    return frame.sort_values(COL_PATH, kind="stable").reset_index(drop=True)


def compute_metrics(predictions: pd.DataFrame, classes: list[str]) -> dict:
    probs = np.stack(predictions[COL_PROBS].to_numpy()).astype(np.float64)
    return metric_fns.classification_metrics(predictions[COL_LABEL].to_numpy(), probs, classes)


def predictions_table(predictions: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Flat per-image predictions for researchers: path, true and predicted class, probabilities."""
    probs = np.stack(predictions[COL_PROBS].to_numpy())
    table = pd.DataFrame({
        "path": predictions[COL_PATH].to_numpy(),
        "true_label": [classes[i] for i in predictions[COL_LABEL]],
        "predicted_label": [classes[i] for i in probs.argmax(1)],
        "confidence": probs.max(1),
    })
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i]
    return table


def write_report(output_uri: str, report: dict, options: StorageOptions,
                 predictions: pd.DataFrame | None = None,
                 history: list[dict] | None = None) -> None:
    """metrics.json, confusion matrix, predictions and (with a history) accuracy/loss curves."""
    storage.write_json(storage.join(output_uri, "metrics.json"), report, options)
    storage.write_bytes(storage.join(output_uri, "confusion_matrix.png"),
                        metric_fns.render_confusion_matrix(report["confusion_matrix"],
                                                           report["classes"]), options)
    if history:
        storage.write_bytes(storage.join(output_uri, "accuracy.png"),
                            metric_fns.render_accuracy_curve(history), options)
        storage.write_bytes(storage.join(output_uri, "loss.png"),
                            metric_fns.render_loss_curve(history), options)
    if predictions is not None:
        buffer = predictions.to_parquet(index=False)
        storage.write_bytes(storage.join(output_uri, "predictions.parquet"), buffer,
                            options)


def skipped_files(index: pd.DataFrame) -> list[dict]:
    """Files that could not be used, with their URI and the reason, for the report."""
    bad = index[index[COL_ERROR] != ""]
    return [{"path": p, "error": e} for p, e in zip(bad[COL_PATH], bad[COL_ERROR], strict=True)]


def run_evaluation(config: EvalConfig) -> dict:
    """`brainray evaluate`: the same metrics and plots as a training run, for any labeled data."""
    options = config.storage
    storage.ensure_writable(config.output, options)
    model_uri = resolve_checkpoint_uri(config.model, options)
    checkpoint = load_checkpoint(model_uri, options)
    classes = checkpoint["classes"]
    print(f"evaluating {checkpoint['model_name']} (model_id {checkpoint['model_id']}, "
          f"classes {classes}) on {storage.redact(config.data)}", flush=True)
    labeled = load_labeled(config.data, classes, preprocess_config(checkpoint), options)
    usable = labeled.index[labeled.index[COL_ERROR] == ""][COL_PATH]
    predictions = predict_labeled(labeled.dataset, usable, model_uri, options, config.batch_size,
                                  config.num_actors, config.use_gpu)
    test = compute_metrics(predictions, classes)
    report = {**test, "model_id": checkpoint["model_id"], "model": storage.redact(model_uri),
              "data": storage.redact(config.data), "skipped_files": skipped_files(labeled.index),
              "config": to_dict(config), "temperature": temperature_of(checkpoint)}
    if getattr(config, "shortcut_check", False):
        from brainray.shortcut import run_shortcut_check

        report["shortcut"] = run_shortcut_check(
            labeled.dataset, usable, model_uri, options, classes, predictions, config.batch_size,
            config.num_actors, config.use_gpu)
    write_report(config.output, report, options, predictions_table(predictions, classes))
    print(metric_fns.format_summary(test), flush=True)
    if "shortcut" in report:
        shortcut = report["shortcut"]
        print(f"shortcut check: balanced accuracy brain only "
              f"{shortcut['brain_only']['balanced_accuracy']:.3f}, background only "
              f"{shortcut['background_only']['balanced_accuracy']:.3f} (chance "
              f"{shortcut['chance_balanced_accuracy']:.3f}): "
              + ("SHORTCUT SUSPECTED" if shortcut["shortcut_suspected"] else "no shortcut found"),
              flush=True)
    if report["skipped_files"]:
        print(f"skipped {len(report['skipped_files'])} unreadable file(s); see metrics.json")
    return report
