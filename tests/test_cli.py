"""Tests for brainray.cli and brainray.config: flag parsing into frozen configs, no training run."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import ray

from brainray import cli
from brainray.cluster import ClusterView
from brainray.config import (
    DEFAULT_CLASSES,
    IMAGE_EXTENSIONS,
    RECIPES,
    EvalConfig,
    PreprocessConfig,
    StorageOptions,
    TrainConfig,
    to_dict,
    to_json,
)
from brainray.data import sample_data_dir


@pytest.fixture(autouse=True)
def _no_aws_overrides(monkeypatch):
    """Parse tests must not depend on the developer's AWS endpoint/region variables."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)


def _train(*flags: str) -> TrainConfig:
    return cli.train_config(cli.build_parser().parse_args(["train", *flags]))


# --- train: defaults and flag mapping ---------------------------------------------------------


def test_embedded_sample_has_four_class_folders_of_images():
    root = Path(sample_data_dir())
    assert root.is_dir()
    for name in DEFAULT_CLASSES:
        images = [p for p in (root / name).iterdir()
                  if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
        assert len(images) >= 20, name


def test_train_without_flags_uses_sample_and_timestamped_run_dir():
    # Given `brainray train` with no flags / When parsed into a config
    config = _train()
    # Then it trains on the embedded sample, into runs/<UTC timestamp>
    assert config.data == sample_data_dir()
    assert config.test_data is None
    parts = Path(config.run_dir).parts
    assert parts[0] == "runs" and len(parts) == 2
    assert re.fullmatch(r"\d{8}-\d{6}", parts[1])
    # and a short demonstration run; every other field is the TrainConfig default
    assert config.epochs == cli.SAMPLE_EPOCHS < TrainConfig.epochs
    defaults = TrainConfig(data=config.data, run_dir=config.run_dir, epochs=cli.SAMPLE_EPOCHS)
    assert config == defaults  # AWS_* variables are cleared by the autouse fixture
    assert config.use_gpu is False
    assert config.classes == DEFAULT_CLASSES


def test_train_flags_map_to_config_fields():
    config = _train(
        "--data", "s3://bucket/mri", "--run-dir", "s3://bucket/runs/a", "--test-data", "/t",
        "--model", "bn_cnn", "--epochs", "5", "--batch-size", "8", "--lr", "0.01",
        "--weight-decay", "0.0001", "--warmup-epochs", "0", "--lr-schedule", "constant",
        "--patience", "2", "--augment", "light", "--precision", "bf16", "--image-size", "128",
        "--seed", "7", "--val-fraction", "0.2", "--test-fraction", "0.15",
        "--dedup-max-hamming", "3", "--num-workers", "2", "--cpus-per-worker", "1.5",
        "--torch-threads", "4", "--max-failures", "0",
        "--s3-endpoint", "http://minio:9000", "--s3-region", "eu-west-1",
    )
    assert config == TrainConfig(
        data="s3://bucket/mri", run_dir="s3://bucket/runs/a", test_data="/t", model="bn_cnn",
        epochs=5, batch_size_per_worker=8, lr=0.01, weight_decay=0.0001, warmup_epochs=0,
        lr_schedule="constant", patience=2, augment="light", precision="bf16", seed=7,
        val_fraction=0.2, test_fraction=0.15, dedup_max_hamming=3, num_workers=2,
        cpus_per_worker=1.5, torch_threads=4, max_failures=0,
        preprocess=PreprocessConfig(image_size=128),
        storage=StorageOptions(s3_endpoint="http://minio:9000", s3_region="eu-west-1"))


def test_batch_size_flag_is_per_worker():
    assert _train("--batch-size", "16").batch_size_per_worker == 16


def test_image_size_flag_sets_preprocess_and_keeps_pixel_limit():
    config = _train("--image-size", "96")
    assert config.preprocess.image_size == 96
    assert config.preprocess.max_image_pixels == PreprocessConfig().max_image_pixels


@pytest.mark.parametrize("flags, parsed, configured", [
    ([], None, False),
    (["--use-gpu"], True, True),
    (["--no-gpu"], False, False),
])
def test_gpu_flags(flags, parsed, configured):
    # parsed None means "auto": resolved against the cluster by init_ray, after parsing
    args = cli.build_parser().parse_args(["train", *flags])
    assert args.use_gpu is parsed
    assert cli.train_config(args).use_gpu is configured


def test_use_gpu_and_no_gpu_are_mutually_exclusive():
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["train", "--use-gpu", "--no-gpu"])
    assert info.value.code == 2


@pytest.mark.parametrize("flag, expected", [
    ("glioma,notumor", ("glioma", "notumor")),
    (" a , b ,c ", ("a", "b", "c")),
    ("x,,y,", ("x", "y")),
])
def test_classes_flag_is_split_and_trimmed(flag, expected):
    assert _train("--classes", flag).classes == expected


@pytest.mark.parametrize("flag", ["glioma", "glioma,glioma", ",,"])
def test_classes_flag_needs_two_unique_names(flag):
    with pytest.raises(ValueError, match="classes must be >= 2 unique names"):
        _train("--classes", flag)


def test_storage_flags_fall_back_to_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert _train().storage == StorageOptions("http://env-endpoint:9000", "eu-central-1")
    assert _train("--s3-region", "us-west-2").storage.s3_region == "us-west-2"


def test_invalid_model_choice_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["train", "--model", "resnet99"])
    assert info.value.code == 2
    assert "invalid choice: 'resnet99'" in capsys.readouterr().err


def test_missing_command_exits_with_usage_error():
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args([])
    assert info.value.code == 2


# --- run(): a bad value fails before Ray starts -----------------------------------------------


def _forbid_ray_init(monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))


def test_run_with_zero_epochs_returns_2_without_starting_ray(capsys, monkeypatch):
    # Given a Ray that must not be started
    _forbid_ray_init(monkeypatch)
    # When `brainray train --epochs 0` runs
    code = cli.run(["train", "--epochs", "0"])
    # Then it fails as a usage error, with one readable line on stderr, before Ray starts
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and len(err.strip().splitlines()) == 1
    assert err.strip() == "brainray train: error: epochs must be >= 1"


def test_run_with_bad_fractions_returns_2_without_starting_ray(capsys, monkeypatch):
    _forbid_ray_init(monkeypatch)
    code = cli.run(["train", "--val-fraction", "0.6", "--test-fraction", "0.5"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "brainray train: error: val + test fractions must be < 1")


@pytest.mark.parametrize("size", ["0", "-32"])
def test_nonpositive_image_size_is_rejected_before_ray(size):
    with pytest.raises(ValueError):
        _train("--image-size", size)


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_flags_map_to_eval_config():
    args = cli.build_parser().parse_args([
        "evaluate", "--model", "runs/a", "--data", "s3://b/test", "--output", "out",
        "--batch-size", "16", "--num-actors", "2", "--use-gpu", "--s3-endpoint", "http://m:9000"])
    assert cli.eval_config(args) == EvalConfig(
        model="runs/a", data="s3://b/test", output="out", batch_size=16, num_actors=2,
        use_gpu=True, storage=StorageOptions(s3_endpoint="http://m:9000"))


def test_evaluate_requires_model_data_and_output():
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["evaluate", "--model", "runs/a"])
    assert info.value.code == 2


# --- TrainConfig ------------------------------------------------------------------------------


def test_train_config_json_round_trip():
    # Given a config with nested dataclasses and tuples
    config = TrainConfig(data="s3://b/d", run_dir="/r", classes=("a", "b"), seed=3,
                         preprocess=PreprocessConfig(image_size=64),
                         storage=StorageOptions("http://m:9000", "eu-west-1"))
    # When written as JSON and parsed back
    loaded = json.loads(to_json(config))
    # Then it is plain JSON (tuples as lists) with every field, and rebuilds the same config
    assert loaded == to_dict(config)
    assert loaded["classes"] == ["a", "b"]
    assert loaded["preprocess"] == {"image_size": 64, "max_image_pixels": 64_000_000}
    assert set(loaded) == {f.name for f in dataclasses.fields(TrainConfig)}
    rebuilt = TrainConfig(**{**loaded, "classes": tuple(loaded["classes"]),
                             "preprocess": PreprocessConfig(**loaded["preprocess"]),
                             "storage": StorageOptions(**loaded["storage"])})
    assert rebuilt == config


def test_train_config_is_frozen():
    config = TrainConfig(data="d", run_dir="r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("fields, message", [
    ({"val_fraction": 0.0}, "val_fraction must be in (0, 1)"),
    ({"val_fraction": 1.0}, "val_fraction must be in (0, 1)"),
    ({"val_fraction": -0.1}, "val_fraction must be in (0, 1)"),
    ({"test_fraction": -0.1}, "test_fraction must be in [0, 1)"),
    ({"test_fraction": 1.0}, "test_fraction must be in [0, 1)"),
    ({"test_fraction": 0.0}, "test_fraction must be > 0 unless test_data is given"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val + test fractions must be < 1"),
    ({"val_fraction": 0.7, "test_fraction": 0.4}, "val + test fractions must be < 1"),
])
def test_train_config_rejects_bad_fractions(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(data="d", run_dir="r", **fields)


def test_split_fractions_sum_to_one():
    carved = TrainConfig(data="d", run_dir="r", val_fraction=0.2, test_fraction=0.1)
    assert carved.split_fractions == pytest.approx({"train": 0.7, "val": 0.2, "test": 0.1})
    held_out = TrainConfig(data="d", run_dir="r", test_data="t", val_fraction=0.2,
                           test_fraction=0.0)
    assert held_out.split_fractions == pytest.approx({"train": 0.8, "val": 0.2})


@pytest.mark.parametrize("fields, message", [
    ({"model": "vgg"}, "model must be one of"),
    ({"augment": "heavy"}, "augment must be one of"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"recipe": "fancy"}, "recipe must be one of"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"tta": "rotate"}, "tta must be one of"),
    ({"label_smoothing": 1.0}, "label smoothing must be in [0, 1)"),
    ({"ema_decay": 1.0}, "EMA decay must be in [0, 1)"),
    ({"backbone_lr_factor": 0.0}, "backbone lr factor must be in (0, 1]"),
    ({"dedup_min_similarity": 1.5}, "dedup min similarity must be in [0, 1]"),
    ({"warmup_epochs": -1}, "warmup epochs must be >= 0"),
    ({"model": "paper_cnn", "width": 16}, "model paper_cnn takes only no size arguments"),
    ({"model": "bn_cnn", "depth": 2}, "model bn_cnn takes only ('width',) size arguments"),
    ({"model": "res_cnn", "width": 0}, "width and depth must be in [1, 1024]"),
    ({"model": "bn_cnn", "weights": "imagenet"}, "--weights needs a torchvision model"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"batch_size_per_worker": 0}, "batch size must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"patience": 0}, "patience must be >= 1"),
    ({"num_workers": 0}, "num_workers must be >= 1"),
])
def test_train_config_rejects_other_bad_values(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(data="d", run_dir="r", **fields)


def test_parsing_does_not_create_the_run_dir(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    _train("--run-dir", str(run_dir))
    assert not run_dir.exists()


# --- multi-node path check --------------------------------------------------------------------

ONE_NODE = ClusterView(alive_nodes=1, alive={"CPU": 2.0})
THREE_NODES = ClusterView(alive_nodes=3, alive={"CPU": 6.0})
AUTOSCALING = ClusterView(alive_nodes=1, alive={"CPU": 6.0}, possible={"CPU": 50.0, "GPU": 4.0},
                          can_add_nodes=True)
S3_TRAIN = ["train", "--data", "s3://b/d", "--run-dir", "s3://b/r"]
S3_SCORE = ["score", "--model", "s3://b/m.pt", "--input", "s3://b/in", "--output", "s3://b/o"]
S3_EVAL = ["evaluate", "--model", "s3://b/m.pt", "--data", "s3://b/d", "--output", "s3://b/o"]


def _config_of(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    return cli._CONFIGS[args.command](args)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--data", "/local/d", "--run-dir", "s3://b/r"], "--data"),
    ([*S3_TRAIN, "--test-data", "/local/t"], "--test-data"),
    (["train", "--data", "s3://b/d", "--run-dir", "runs/local"], "--run-dir"),
    ([*S3_TRAIN, "--model", "resnet18", "--weights", "/local/r18.pth"], "--weights"),
    (["score", "--model", "/local/m.pt", "--input", "s3://b/in", "--output", "s3://b/o"],
     "--model"),
    ([*S3_SCORE, "--input", "/local/archive"], "--input"),
    (["score", "--model", "s3://b/m.pt", "--input", "s3://b/in", "--output", "out"],
     "--output"),
    ([*S3_SCORE, "--explain-review-dir", "/local/review"], "--explain-review-dir"),
    (["evaluate", "--model", "s3://b/m.pt", "--data", "/local/d", "--output", "s3://b/o"],
     "--data"),
])
def test_a_local_path_is_refused_when_work_may_run_on_another_node(argv, flag):
    # Given a job with one local path among shared ones
    config = _config_of(argv)
    # When the cluster is one fixed node it is accepted
    cli.check_paths_shared(argv[0], config, ONE_NODE)
    # Then with more nodes alive, or an autoscaler that may add some, it is refused by name
    for view in (THREE_NODES, AUTOSCALING):
        with pytest.raises(ValueError, match=f"{flag} .* is a local path.*use s3://"):
            cli.check_paths_shared(argv[0], config, view)


@pytest.mark.parametrize("argv", [S3_TRAIN, S3_SCORE, S3_EVAL,
                                  [*S3_TRAIN, "--model", "resnet18", "--weights", "imagenet"]])
def test_shared_paths_are_accepted_on_a_multi_node_cluster(argv):
    cli.check_paths_shared(argv[0], _config_of(argv), THREE_NODES)


def test_train_waits_for_resources_as_long_as_its_flag_says(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", raising=False)
    config = _config_of([*S3_TRAIN, "--resource-wait-s", "90"])
    assert cli._job_env_vars(config) == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "90.0"}
    assert cli._job_env_vars(_config_of(S3_SCORE)) == {}


def test_init_ray_gives_the_jobs_workers_the_allocator_settings(monkeypatch):
    import ray

    from brainray import cluster, runtime_env

    calls = []
    for name in (*runtime_env.ALLOCATOR_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runtime_env, "tune_this_process", lambda: True)
    monkeypatch.setattr(cluster, "current_view", lambda: ONE_NODE)
    assert cli.init_ray("auto", use_gpu=False) == (False, ONE_NODE)
    assert calls[0]["runtime_env"] == {"env_vars": runtime_env.ALLOCATOR_ENV}
    assert calls[0]["address"] == "auto"


# --- recipes ---------------------------------------------------------------------------------


def test_the_config_defaults_are_the_default_recipe():
    config = TrainConfig(data="d", run_dir="r")
    values = {**to_dict(config), "image_size": config.preprocess.image_size}
    assert {k: values[k] for k in RECIPES["default"]} == RECIPES["default"]
    assert config.recipe == "default" and config.recipe_overrides() == {}


def test_recipe_paper_sets_the_papers_setup():
    config = _train("--data", "/d", "--recipe", "paper")
    assert (config.model, config.preprocess.image_size, config.augment, config.optimizer) == (
        "paper_cnn", 224, "paper", "adam")
    assert config.lr == 1e-3 and config.lr_schedule == "constant"
    assert config.recipe == "paper" and config.recipe_overrides() == {}


def test_a_flag_overrides_its_recipe_field_and_only_that_one():
    config = _train("--data", "/d", "--recipe", "paper", "--lr", "3e-4", "--image-size", "128")
    assert config.lr == 3e-4 and config.preprocess.image_size == 128
    assert config.model == "paper_cnn" and config.augment == "paper"
    assert config.recipe_overrides() == {"lr": 3e-4, "image_size": 128}


@pytest.mark.parametrize("flag, value, field_name, expected", [
    ("--width", "48", "width", 48), ("--label-smoothing", "0.1", "label_smoothing", 0.1),
    ("--ema-decay", "0.998", "ema_decay", 0.998), ("--tta", "hflip", "tta", "hflip"),
    ("--optimizer", "adamw", "optimizer", "adamw"),
    ("--lr-schedule", "onecycle", "lr_schedule", "onecycle"),
    ("--dedup-min-similarity", "0.99", "dedup_min_similarity", 0.99),
    ("--backbone-lr-factor", "0.2", "backbone_lr_factor", 0.2),
])
def test_new_training_flags_reach_the_config(flag, value, field_name, expected):
    assert getattr(_train("--data", "/d", flag, value), field_name) == expected


def test_weights_flag_with_a_torchvision_model():
    config = _train("--data", "/d", "--model", "resnet18", "--weights", "s3://b/r18.pth")
    assert config.weights == "s3://b/r18.pth" and config.architecture == {}


def test_the_sample_run_shortens_the_recipes_epochs_and_says_so():
    config = _train()
    assert config.epochs == cli.SAMPLE_EPOCHS
    assert config.recipe_overrides() == {"epochs": cli.SAMPLE_EPOCHS}


# --- the console log of a job whose output is on S3 ---------------------------------------


def _local_log(tmp_path, text: str = "ray said this\n") -> Path:
    folder = tmp_path / "brainray-log-x"
    folder.mkdir()
    (folder / "train-1.log").write_text(text)
    return folder / "train-1.log"


@pytest.mark.s3
def test_the_log_of_an_s3_run_is_copied_there_and_its_temp_folder_removed(tmp_path, s3_bucket,
                                                                          s3_options):
    client, bucket = s3_bucket
    log = _local_log(tmp_path)
    cli._copy_log(str(log), f"s3://{bucket}/run/logs/train-1.log", s3_options)
    body = client.get_object(Bucket=bucket, Key="run/logs/train-1.log")["Body"].read()
    assert body == b"ray said this\n"
    assert not log.parent.exists()


@pytest.mark.s3
def test_a_log_that_cannot_be_copied_stays_where_the_warning_says(tmp_path, s3_options, capsys):
    log = _local_log(tmp_path)
    cli._copy_log(str(log), "s3://no-such-bucket-brainray/run/logs/train-1.log", s3_options)
    assert log.read_text() == "ray said this\n"
    out = capsys.readouterr().out
    assert "cannot copy Ray's log" in out and f"it stays at {log}" in out
