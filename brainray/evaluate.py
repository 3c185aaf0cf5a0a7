"""`brainray evaluate`: a checkpoint on labeled data, with the same metrics, plots and report
(report.html included) as the test split of a training run (brainray.report)."""

from __future__ import annotations

from brainray import metrics as metric_fns
from brainray import storage
from brainray.checkpoint import (
    load_checkpoint,
    locate_checkpoint,
    preprocess_config,
    temperature_of,
)
from brainray.config import COL_ERROR, COL_PATH, EvalConfig, to_dict
from brainray.console import say
from brainray.data import load_labeled
from brainray.predict import predict_labeled
from brainray.report import (
    compute_metrics,
    mistake_gallery,
    predictions_table,
    skipped_files,
    write_html_report,
    write_report,
)
from brainray.shortcut import run_shortcut_check


def run_evaluation(config: EvalConfig) -> dict:
    """`brainray evaluate`: the same metrics and plots as a training run, for any labeled data."""
    options = config.storage
    storage.ensure_writable(config.output, options)
    model_uri = locate_checkpoint(config.model, options)
    checkpoint = load_checkpoint(model_uri, options)
    classes = checkpoint["classes"]
    say(f"evaluating {checkpoint['model_name']} (model_id {checkpoint['model_id']}, "
          f"classes {classes}) on {storage.redact(config.data)}")
    labeled = load_labeled(config.data, classes, preprocess_config(checkpoint), options)
    usable = labeled.index[labeled.index[COL_ERROR] == ""][COL_PATH]
    predictions = predict_labeled(labeled.dataset, usable, model_uri, options, config.batch_size,
                                  config.num_actors, config.use_gpu)
    test = compute_metrics(predictions, classes)
    report = {**test, "model_id": checkpoint["model_id"], "model_name": checkpoint["model_name"],
              "model": storage.redact(model_uri),
              "data": storage.redact(config.data), "skipped_files": skipped_files(labeled.index),
              "config": to_dict(config), "temperature": temperature_of(checkpoint)}
    if config.shortcut_check:
        report["shortcut"] = run_shortcut_check(
            labeled.dataset, usable, model_uri, options, classes, predictions, config.batch_size,
            config.num_actors, config.use_gpu)
    figures = write_report(config.output, report, options, predictions_table(predictions, classes))
    write_html_report(config.output, report, figures, options,
                      mistake_gallery(labeled.dataset, predictions, checkpoint))
    say(metric_fns.format_summary(test))
    if "shortcut" in report:
        shortcut = report["shortcut"]
        say(f"shortcut check: balanced accuracy brain only "
              f"{shortcut['brain_only']['balanced_accuracy']:.3f}, background only "
              f"{shortcut['background_only']['balanced_accuracy']:.3f} (chance "
              f"{shortcut['chance_balanced_accuracy']:.3f}): "
              + ("SHORTCUT SUSPECTED" if shortcut["shortcut_suspected"] else "no shortcut found"))
    if report["skipped_files"]:
        say(f"skipped {len(report['skipped_files'])} unreadable file(s); see metrics.json")
    return report
