"""Tests for brainray.search: the search space, trial configs, concurrency, and a real search."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from ray import tune

from brainray import search
from brainray.cli import run
from brainray.config import RECIPES, SearchConfig
from tests.conftest import tiny_dataset_files, write_tree


def _search(**fields) -> SearchConfig:
    return SearchConfig(data="/d", output="/o", **fields)


def test_space_kinds_become_tune_domains():
    space = search.parse_space({"lr": {"loguniform": [1e-4, 1e-2]},
                                "label_smoothing": {"uniform": [0.0, 0.2]},
                                "augment": {"choice": ["light", "medium"]},
                                "epochs": {"randint": [5, 10]}})
    assert isinstance(space["augment"], tune.search.sample.Categorical)
    assert space["augment"].categories == ["light", "medium"]
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["epochs"], tune.search.sample.Integer)


@pytest.mark.parametrize("space, message", [
    ({"seed": {"choice": [1, 2]}}, "cannot search 'seed'"),
    ({"lr": {"normal": [0, 1]}}, "write one of choice, uniform, loguniform, randint"),
    ({"lr": [1e-3, 1e-2]}, "write one of"),
    ({"lr": {"uniform": [1e-3]}}, "uniform needs [low, high]"),
    ({"augment": {"choice": []}}, "choice needs a non-empty list"),
    ({}, "a search space is a mapping"),
])
def test_a_bad_space_is_refused_with_what_is_allowed(space, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        search.parse_space(space)


def test_the_default_space_parses():
    assert set(search.parse_space(search.DEFAULT_SPACE)) == set(search.DEFAULT_SPACE)


def test_a_trial_is_the_recipe_with_the_trials_values():
    config = search.trial_config(_search(epochs=7, seed=3, recipe="paper"),
                                 {"lr": 1e-4, "image_size": 96}, "/o/trials/t1")
    assert config.run_dir == "/o/trials/t1" and config.recipe == "paper"
    assert config.lr == 1e-4 and config.preprocess.image_size == 96
    assert config.epochs == 7 and config.seed == 3
    assert config.model == RECIPES["paper"]["model"]
    assert config.recipe_overrides() == {"lr": 1e-4, "image_size": 96, "epochs": 7}


@pytest.mark.parametrize("resources, fields, expected", [
    ({"CPU": 2}, {}, 1),  # one training worker and one CPU for Ray Data
    ({"CPU": 8}, {}, 4),
    ({"CPU": 8}, {"max_concurrent_trials": 2}, 2),
    ({"CPU": 8}, {"num_workers": 3}, 2),
    ({"CPU": 64, "GPU": 2}, {"use_gpu": True}, 2),
    ({"CPU": 1}, {}, 1),
])
def test_concurrent_trials_fit_the_cluster(resources, fields, expected):
    assert search.concurrent_trials(_search(**fields), resources) == expected


def test_the_best_trial_is_the_completed_one_with_the_lowest_validation_loss():
    table = pd.DataFrame([
        {"trial_id": "a", "status": "stopped by ASHA", "best_val_loss": 0.1,
         "test_accuracy": float("nan"), "run_dir": "/o/a", "param_lr": 1e-3},
        {"trial_id": "b", "status": "completed", "best_val_loss": 0.3, "test_accuracy": 0.9,
         "run_dir": "/o/b", "param_lr": 2e-3},
        {"trial_id": "c", "status": "completed", "best_val_loss": 0.2, "test_accuracy": 0.8,
         "run_dir": "/o/c", "param_lr": 3e-3},
    ]).sort_values("best_val_loss")
    assert search.best_trial(table) == {"trial_id": "c", "run_dir": "/o/c",
                                        "best_val_loss": 0.2, "test_accuracy": 0.8,
                                        "params": {"lr": 3e-3}}
    assert search.best_trial(table[table["status"] != "completed"]) is None


@pytest.mark.ray
@pytest.mark.slow
def test_tune_runs_trials_writes_the_table_and_restores(ray_cluster, tmp_path):
    # Given a tiny dataset and a two-value space
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=6))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {choice: [1.0e-3, 3.0e-3]}\nimage_size: {choice: [32]}\n"
                     "batch_size_per_worker: {choice: [8]}\nwarmup_epochs: {choice: [0]}\n")
    output = tmp_path / "search"
    flags = ["tune", "--data", str(data), "--output", str(output), "--trials", "2",
             "--epochs", "2", "--grace-epochs", "1", "--space", str(space), "--no-gpu"]

    # When the search runs
    assert run(flags) == 0

    # Then each trial is a row, and the best is a complete run directory
    table = pd.read_parquet(output / "trials.parquet")
    assert len(table) == 2 and set(table["param_lr"]) <= {1e-3, 3e-3}
    assert set(table["status"]) <= {"completed", "stopped by ASHA"}
    best = json.loads((output / "best.json").read_text())["best"]
    assert (tmp_path / best["run_dir"] / "model.pt").exists()
    assert best["trial_id"] in table["trial_id"].tolist()
    trained = (tmp_path / best["run_dir"] / "model.pt").stat().st_mtime_ns

    # When relaunched with the same output, Then it restores the finished search, retraining
    # nothing, and writes the same table
    assert run(flags) == 0
    assert (tmp_path / best["run_dir"] / "model.pt").stat().st_mtime_ns == trained
    again = pd.read_parquet(output / "trials.parquet")
    pd.testing.assert_frame_equal(again, table)
