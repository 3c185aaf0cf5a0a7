"""`brainray tune`: a hyperparameter search on Ray Tune whose trials are training runs.

Each trial is `brainray train` itself (`brainray.train.run_training`) with the trial's values in
place of the recipe's, writing a complete run directory to <output>/trials/<trial id>/. Ray Train's
epoch reports reach Tune through `TuneReportCallback`, so ASHA can stop weak trials on validation
loss after `grace_epochs`. Relaunching with the same --output restores the search: finished
trials are kept, unfinished ones resume from their latest checkpoint.
"""

from __future__ import annotations

import math

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from brainray import storage
from brainray.config import (
    RECIPES,
    SEARCHABLE_FIELDS,
    SPACE_KINDS,
    PreprocessConfig,
    SearchConfig,
    TrainConfig,
    to_dict,
)
from brainray.console import say
from brainray.train import run_training

EXPERIMENT = "tune"
TRIALS_DIR = "trials"
RESULTS_FILE = "trials.parquet"
BEST_FILE = "best.json"
METRIC = "val_loss"

# The built-in space: what the recipe study found to matter, around the default recipe.
DEFAULT_SPACE: dict[str, dict] = {
    "lr": {"loguniform": [5e-4, 5e-3]},
    "weight_decay": {"choice": [0.0, 1e-5, 1e-4]},
    "label_smoothing": {"choice": [0.0, 0.1]},
    "ema_decay": {"choice": [0.0, 0.998]},
    "augment": {"choice": ["light", "medium"]},
}


def parse_space(space: dict) -> dict:
    """A space as written in YAML ({field: {kind: args}}) -> Tune's sampling objects; refuses
    unknown fields and kinds with a message that lists the allowed ones."""
    if not isinstance(space, dict) or not space:
        raise ValueError("a search space is a mapping of training fields to {kind: values}")
    parsed = {}
    for name, spec in space.items():
        if name not in SEARCHABLE_FIELDS:
            raise ValueError(f"cannot search {name!r}; searchable: {', '.join(SEARCHABLE_FIELDS)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
            raise ValueError(f"{name}: write one of {', '.join(SPACE_KINDS)}, e.g. "
                             f"{{choice: [a, b]}} or {{loguniform: [1e-4, 1e-2]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise ValueError(f"{name}: {kind} needs " + (
                "a non-empty list" if kind == "choice" else "[low, high]"))
        parsed[name] = getattr(tune, kind)(values) if kind == "choice" else getattr(
            tune, kind)(*values)
    return parsed


def load_space(config: SearchConfig) -> dict:
    if config.space is None:
        return parse_space(DEFAULT_SPACE)
    text = storage.read_bytes(config.space, config.storage).decode()
    try:
        return parse_space(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise ValueError(f"{storage.redact(config.space)} is not valid YAML: {exc}") from exc


def trial_config(config: SearchConfig, params: dict, run_dir: str) -> TrainConfig:
    """The training run of one trial: the recipe, the search's settings, the trial's values."""
    fields = {**RECIPES[config.recipe], "epochs": config.epochs, **params}
    image_size = fields.pop("image_size")
    return TrainConfig(
        data=config.data, run_dir=run_dir, test_data=config.test_data, recipe=config.recipe,
        **fields, seed=config.seed, num_workers=config.num_workers,
        cpus_per_worker=config.cpus_per_worker, use_gpu=config.use_gpu,
        preprocess=PreprocessConfig(image_size=image_size), storage=config.storage)


def _run_trial(params: dict, search: SearchConfig) -> None:
    """One Tune trial: a whole training run in its own directory, reporting every epoch."""
    trial_id = tune.get_context().get_trial_id()
    run_dir = storage.join(search.output, TRIALS_DIR, trial_id)
    run_training(trial_config(search, params, run_dir), callbacks=[TuneReportCallback()])


def concurrent_trials(config: SearchConfig, resources: dict[str, float]) -> int:
    """Trials that fit side by side: each needs its workers plus one CPU for Ray Data (reading
    and decoding), or a GPU per worker; `max_concurrent_trials` caps it when given."""
    per_trial = config.num_workers * config.cpus_per_worker + 1
    fit = int(resources.get("CPU", 1) // per_trial)
    if config.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // config.num_workers))
    fit = max(1, fit)
    return min(fit, config.max_concurrent_trials) if config.max_concurrent_trials else fit


def _tuner(config: SearchConfig) -> tune.Tuner:
    fs, path = storage.resolve(config.output, config.storage)
    # The trial's own process only waits on its TorchTrainer: it holds no CPU, so a 2-core node
    # keeps one for the training worker and one for Ray Data. (Tune refuses an empty request:
    # one byte of memory stands for "nothing".)
    trainable = tune.with_resources(tune.with_parameters(_run_trial, search=config),
                                    tune.PlacementGroupFactory([{"memory": 1}]))
    experiment = f"{path.rstrip('/')}/{EXPERIMENT}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        say(f"restoring the search in {storage.redact(config.output)}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=fs)
    # ASHA stops every trial that reaches max_t; one past the last epoch lets a surviving trial
    # finish its run (test split, calibration, report) after its last epoch's report.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=config.epochs + 1,
                              grace_period=min(config.grace_epochs, config.epochs),
                              reduction_factor=2)
    return tune.Tuner(
        trainable, param_space=load_space(config),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=config.trials, scheduler=scheduler,
            # Its own cap: Tune ignores max_concurrent_trials beside a variant generator.
            search_alg=BasicVariantGenerator(
                random_state=config.seed,
                max_concurrent=concurrent_trials(config, ray.cluster_resources()))),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=fs))


def _trial_row(result, config: SearchConfig) -> dict:
    """One trial's line of the results table: its values, how far it got, its test figures."""
    history = result.metrics_dataframe
    trial_id = result.metrics.get("trial_id") if result.metrics else None
    run_dir = storage.join(config.output, TRIALS_DIR, trial_id or "unknown")
    metrics_uri = storage.join(run_dir, "metrics.json")
    finished = trial_id is not None and storage.exists(metrics_uri, config.storage)
    test = storage.read_json(metrics_uri, config.storage) if finished else {}
    epochs_run = 0 if history is None else len(history)
    status = ("errored" if result.error else "completed" if finished else "stopped by ASHA")
    row = {"trial_id": trial_id, "status": status, "epochs_run": epochs_run,
           "best_val_loss": float(history[METRIC].min()) if epochs_run else math.nan,
           "best_val_accuracy": float(history["val_accuracy"].max()) if epochs_run else math.nan,
           "test_accuracy": test.get("accuracy", math.nan),
           "test_macro_f1": test.get("macro_f1", math.nan),
           "baseline_1nn": (test.get("baseline_1nn") or {}).get("accuracy", math.nan),
           "run_dir": storage.redact(run_dir)}
    return {**row, **{f"param_{k}": v for k, v in sorted(result.config.items())}}


def results_table(grid, config: SearchConfig) -> pd.DataFrame:
    rows = [_trial_row(result, config) for result in grid]
    # trial_id breaks ties, so that a restored search lists its trials in the same order
    return pd.DataFrame(rows).sort_values(["best_val_loss", "trial_id"]).reset_index(drop=True)


def best_trial(table: pd.DataFrame) -> dict | None:
    """The completed trial with the lowest validation loss (its run dir is a full run)."""
    completed = table[table["status"] == "completed"]
    if completed.empty:
        return None
    best = completed.iloc[0]
    return {"trial_id": best["trial_id"], "run_dir": best["run_dir"],
            "best_val_loss": float(best["best_val_loss"]),
            "test_accuracy": float(best["test_accuracy"]),
            "params": {k.removeprefix("param_"): _plain(best[k]) for k in table.columns
                       if k.startswith("param_")}}


def _plain(value):
    """A numpy scalar from the table as the Python value JSON can hold."""
    return value.item() if hasattr(value, "item") else value


def _print_summary(table: pd.DataFrame, best: dict | None) -> None:
    shown = table.drop(columns=["run_dir"]).to_string(index=False, float_format="%.4f")
    say(f"search: {len(table)} trials, {int((table['status'] == 'completed').sum())} "
          f"completed\n{shown}")
    if best is not None:
        say(f"best trial {best['trial_id']} (val loss {best['best_val_loss']:.4f}, test "
              f"accuracy {best['test_accuracy']:.4f}): {best['run_dir']}")


def run_search(config: SearchConfig) -> pd.DataFrame:
    say("brainray tune\n" + storage.redacted_json(config))
    storage.ensure_writable(config.output, config.storage)
    load_space(config)  # a bad space fails before any trial starts
    grid = _tuner(config).fit()
    table = results_table(grid, config)
    best = best_trial(table)
    storage.write_bytes(storage.join(config.output, RESULTS_FILE), table.to_parquet(index=False),
                        config.storage)
    storage.write_json(storage.join(config.output, BEST_FILE),
                       {"best": best, "search": storage.redact_values(to_dict(config))},
                       config.storage)
    _print_summary(table, best)
    if best is None:
        raise RuntimeError(f"no trial completed ({', '.join(sorted(set(table['status'])))}); "
                           f"see {storage.redact(config.output)}/{EXPERIMENT}/ for each "
                           "trial's error")
    return table
