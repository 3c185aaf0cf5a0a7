"""Command line: `brainray train|tune|evaluate|score|report|explain|export`. Flags become frozen
configs.

`ray.init` lives only here; report, explain and export run on the driver without Ray.

Exit status 0 on success; on failure a one-line reason on stderr and status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import os
import shutil
import sys
import tempfile
import traceback

from brainray.config import (
    AUGMENT_LEVELS,
    DEFAULT_CLASSES,
    LR_SCHEDULES,
    MODEL_NAMES,
    OPTIMIZERS,
    PLACEMENT_STRATEGIES,
    PRECISIONS,
    RECIPE_NAMES,
    RECIPES,
    TTA_MODES,
    EvalConfig,
    ExplainConfig,
    ExportConfig,
    PreprocessConfig,
    ReportConfig,
    ScoreConfig,
    SearchConfig,
    TrainConfig,
)

SAMPLE_EPOCHS = 5


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside each flag (unless None: the help says what happens then);
    descriptions and examples kept as written."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _command(sub, name: str, summary: str, description: str, examples: str):
    return sub.add_parser(name, help=summary, description=description,
                          epilog="examples:\n" + examples, formatter_class=_HelpFormatter)


def _add_storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (credentials come from the AWS chain)")
    group.add_argument("--s3-endpoint", default=None,
                       help="S3-compatible endpoint URL, e.g. http://minio:9000 "
                            "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS)")
    group.add_argument("--s3-region", default=None,
                       help="S3 region (default: $AWS_REGION or $AWS_DEFAULT_REGION, else "
                            "us-east-1)")


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray cluster")
    group.add_argument("--address", default=None,
                       help="Ray cluster address (default: $RAY_ADDRESS, as set by `ray job "
                            "submit`, else start a local single-node Ray)")
    gpu = group.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None,
                     help="one GPU per worker (default: auto, if the cluster has GPUs)")
    gpu.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="CPU only")
    group.add_argument("--verbose", action="store_true",
                       help="show Ray's own output on the console too (by default it goes to a "
                            "log file in the output's logs/ folder)")


_TRAIN_EXAMPLES = """\
  brainray train                                   # the embedded sample, 5 epochs, a demo
  brainray train --data /data/Training --run-dir runs/best          # the default recipe
  brainray train --data s3://bucket/Training --run-dir s3://bucket/runs/paper --recipe paper
  brainray train --data /data/Training --model resnet18 --weights imagenet --image-size 224
"""


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("data and outputs")
    io.add_argument("--data", default=None,
                    help="labeled images: folder URI with one sub-folder per class, or a "
                         "CSV/Parquet manifest with path,label (default: embedded sample)")
    io.add_argument("--run-dir", default=None,
                    help="where the run is written (local path or s3://); relaunching with the "
                         "same run dir resumes it (default: ./runs/<timestamp>)")
    io.add_argument("--test-data", default=None,
                    help="held-out labeled test folder/manifest; default: a test split is carved "
                         "out of --data")
    io.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                    help="comma-separated class names = folder names, in output order")


# Flags that a recipe sets: (dest, TrainConfig field). Their default is None ("the recipe's"), so
# that a flag given on the command line, and only that, overrides the recipe.
_RECIPE_FLAGS = (("model", "model"), ("image_size", "image_size"), ("width", "width"),
                 ("depth", "depth"), ("augment", "augment"), ("epochs", "epochs"),
                 ("patience", "patience"), ("batch_size", "batch_size_per_worker"),
                 ("optimizer", "optimizer"), ("lr", "lr"), ("weight_decay", "weight_decay"),
                 ("warmup_epochs", "warmup_epochs"), ("lr_schedule", "lr_schedule"),
                 ("label_smoothing", "label_smoothing"), ("ema_decay", "ema_decay"),
                 ("tta", "tta"))


def _recipe_help(field_name: str) -> str:
    values = ", ".join(f"{name} {recipe[field_name]}" for name, recipe in RECIPES.items())
    return f"(recipe: {values})"


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("recipe: model and optimisation (each flag overrides --recipe)")
    m.add_argument("--recipe", choices=RECIPE_NAMES, default="default",
                   help="default: the best recipe measured (README, Results); paper: the paper's "
                        "CNN at 224 px, its augmentation, Adam 1e-3")
    add = m.add_argument
    add("--model", choices=MODEL_NAMES, default=None,
        help="paper_cnn: the paper's network; bn_cnn: batch-norm + global pooling; res_cnn: a "
             "small residual net; resnet18/resnet50/efficientnet_b0/convnext_tiny: torchvision's "
             + _recipe_help("model"))
    add("--image-size", type=int, default=None,
        help="images are resized to this square size in pixels " + _recipe_help("image_size"))
    add("--width", type=int, default=None,
        help="channels of the first stage, doubling per stage (bn_cnn 32, res_cnn 32)")
    add("--depth", type=int, default=None, help="residual blocks per stage (res_cnn 1)")
    add("--weights", default=None,
        help="initial weights of a torchvision model: 'imagenet' (torchvision's, from $TORCH_HOME "
             "or downloaded) or a state-dict file URI (local or s3://)")
    add("--backbone-lr-factor", type=float, default=TrainConfig.backbone_lr_factor,
        help="with --weights: the backbone learns at lr x this, the new head at lr")
    add("--augment", choices=AUGMENT_LEVELS, default=None,
        help="paper: rotation 30 deg, h/v flips, zoom/crop, brightness/contrast 0.2; medium: "
             "rotation 15, h flips, zoom 0.9-1.1, 0.15; light: rotation 10, h flips, zoom "
             "0.95-1.05, 0.1 " + _recipe_help("augment"))
    add("--epochs", type=int, default=None,
        help=f"maximum epochs ({SAMPLE_EPOCHS} on the embedded sample) " + _recipe_help("epochs"))
    add("--patience", type=int, default=None,
        help="early stopping: epochs without validation-loss improvement "
             + _recipe_help("patience"))
    add("--batch-size", type=int, default=None,
        help="images per batch per worker " + _recipe_help("batch_size_per_worker"))
    add("--optimizer", choices=OPTIMIZERS, default=None,
        help="adam (weight decay as L2) or adamw (decoupled) " + _recipe_help("optimizer"))
    add("--lr", type=float, default=None, help="peak learning rate " + _recipe_help("lr"))
    add("--weight-decay", type=float, default=None, help=_recipe_help("weight_decay"))
    add("--warmup-epochs", type=int, default=None,
        help="epochs of linear learning-rate warm-up " + _recipe_help("warmup_epochs"))
    add("--lr-schedule", choices=LR_SCHEDULES, default=None,
        help="after warm-up: cosine to 0, constant; onecycle: up over the first quarter of the "
             "steps, then down (ignores warm-up) " + _recipe_help("lr_schedule"))
    add("--label-smoothing", type=float, default=None,
        help="of the training loss; validation loss stays plain cross-entropy "
             + _recipe_help("label_smoothing"))
    add("--ema-decay", type=float, default=None,
        help="per-step decay of an exponential moving average of the weights, which is then "
             "validated and shipped; 0 = off " + _recipe_help("ema_decay"))
    add("--tta", choices=TTA_MODES, default=None,
        help="test-time augmentation stored with the model, used by evaluate/score/export: "
             "hflip averages the logits of the image and its mirror " + _recipe_help("tta"))


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    m = p.add_argument_group("run")
    m.add_argument("--shuffle-buffer", type=int, default=d["shuffle_buffer_images"].default,
                   help="images per worker in the local shuffle buffer, drawn in a new order "
                        "every epoch (the train split is also shuffled once)")
    m.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default,
                   help="auto: fp16 AMP on GPU, fp32 on CPU; bf16-stem: bf16 for paper_cnn's first "
                        "block only (faster on CPUs with native bf16; README, Performance)")
    m.add_argument("--seed", type=int, default=d["seed"].default,
                   help="seeds the split, shuffling, augmentation and initialisation")
    s = p.add_argument_group("split")
    s.add_argument("--val-fraction", type=float, default=d["val_fraction"].default)
    s.add_argument("--test-fraction", type=float, default=d["test_fraction"].default)
    s.add_argument("--dedup-max-hamming", type=int, default=d["dedup_max_hamming"].default,
                   help="images whose 64-bit perceptual hashes differ in at most this many bits "
                        "are near-duplicates and stay in one split")
    s.add_argument("--dedup-min-similarity", type=float,
                   default=d["dedup_min_similarity"].default,
                   help="> 0: also keep images whose 32x32 thumbnails are at least this "
                        "cosine-similar in one split (stricter; e.g. 0.99)")
    c = p.add_argument_group("workers")
    c.add_argument("--num-workers", type=int, default=d["num_workers"].default,
                   help="Ray Train (DDP) workers")
    c.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"].default,
                   help="CPUs reserved per worker; also its torch thread count")
    c.add_argument("--gpus-per-worker", type=float, default=d["gpus_per_worker"].default,
                   help="with GPUs: 1 per worker, or a fraction to put several on one GPU")
    c.add_argument("--torch-threads", type=int, default=d["torch_threads"].default,
                   help="intra-op threads per worker; 0 = the node's cores / its workers")
    c.add_argument("--max-failures", type=int, default=d["max_failures"].default,
                   help="restarts from the latest checkpoint after a worker (or its node) dies")
    c.add_argument("--resource-wait-s", type=float, default=d["resource_wait_s"].default,
                   help="how long the workers wait for CPUs/GPUs (e.g. for GPU nodes the "
                        "autoscaler starts) before the run fails saying so")
    c.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES,
                   default=d["placement_strategy"].default,
                   help="how workers are placed over nodes: PACK fills nodes, SPREAD spreads "
                        "them, STRICT_SPREAD puts each on its own node")
    t = p.add_argument_group("calibration and abstention")
    t.add_argument("--target-accuracy", type=float, default=d["target_accuracy"].default,
                   help="the review threshold stored with the model is the smallest calibrated "
                        "confidence whose accepted validation images reach this accuracy")


def _add_tracking_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    k = p.add_argument_group("experiment tracking (TensorBoard events always go to "
                             "<run-dir>/tensorboard/)")
    k.add_argument("--mlflow-tracking-uri", default=None,
                   help="log the run to MLflow: params, per-epoch metrics, test metrics and the "
                        "run's files (default: $MLFLOW_TRACKING_URI; unset = no MLflow)")
    k.add_argument("--mlflow-experiment", default=d["mlflow_experiment"].default,
                   help="MLflow experiment name")
    k.add_argument("--mlflow-register-model", default=None, metavar="NAME",
                   help="also register model.pt as a version of this registered model, tagged "
                        "with the test metrics")


def _train_parser(sub) -> None:
    p = _command(sub, "train", "train a classifier; with no flags, on the embedded sample",
                 "Train a tumor classifier on labeled MRI slices (one folder per class, or a "
                 "manifest) with Ray Train, then calibrate it and write a complete run "
                 "directory: model.pt, metrics.json, plots, MODEL_CARD.md. The same --run-dir "
                 "again resumes the run.", _TRAIN_EXAMPLES)
    _add_data_flags(p)
    _add_recipe_flags(p)
    _add_run_flags(p)
    _add_tracking_flags(p)
    _add_cluster_flags(p)
    _add_storage_flags(p)


_TUNE_EXAMPLES = """\
  brainray tune --data /data/Training --output runs/search --trials 8 --epochs 15
  brainray tune --data s3://b/Training --output s3://b/search --space space.yaml

space.yaml maps training fields to one of choice / uniform / loguniform / randint:
  lr: {loguniform: [5.0e-4, 5.0e-3]}
  augment: {choice: [light, medium]}
  label_smoothing: {choice: [0.0, 0.1]}
"""


def _tune_parser(sub) -> None:
    p = _command(sub, "tune", "hyperparameter search: trials of `train` on Ray Tune",
                 "Search training settings with Ray Tune: every trial is a full `brainray "
                 "train` run in <output>/trials/<id>/, ASHA stops weak trials on validation "
                 "loss, and the results table goes to <output>/trials.parquet. Relaunch with the "
                 "same --output to resume an interrupted search.", _TUNE_EXAMPLES)
    d = SearchConfig.__dataclass_fields__
    p.add_argument("--data", required=True, help="labeled images, as for `train --data`")
    p.add_argument("--output", required=True, help="folder URI for the search (local or s3://)")
    p.add_argument("--test-data", default=None, help="held-out labeled test data (optional)")
    p.add_argument("--trials", type=int, default=d["trials"].default,
                   help="number of trials (sampled from the space)")
    p.add_argument("--space", default=None,
                   help="YAML search space URI (default: lr, weight decay, label smoothing, EMA "
                        "and augmentation around the default recipe)")
    p.add_argument("--recipe", choices=RECIPE_NAMES, default=d["recipe"].default,
                   help="settings the space does not vary come from this recipe")
    p.add_argument("--epochs", type=int, default=d["epochs"].default,
                   help="epoch budget of each trial (ASHA stops weak trials earlier)")
    p.add_argument("--grace-epochs", type=int, default=d["grace_epochs"].default,
                   help="no trial is stopped before this many epochs")
    p.add_argument("--max-concurrent-trials", type=int,
                   default=d["max_concurrent_trials"].default,
                   help="0 = as many as the cluster's CPUs (or GPUs) hold")
    p.add_argument("--seed", type=int, default=d["seed"].default,
                   help="the split's and the sampler's seed (every trial sees the same split)")
    p.add_argument("--num-workers", type=int, default=d["num_workers"].default,
                   help="DDP workers per trial")
    p.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"].default)
    _add_cluster_flags(p)
    _add_storage_flags(p)


def _evaluate_parser(sub) -> None:
    p = _command(sub, "evaluate", "metrics and plots of a trained model on labeled data",
                 "Score labeled images with a trained model and write the same metrics.json, "
                 "plots and predictions.parquet as a training run's test split.",
                 "  brainray evaluate --model runs/best --data /data/Testing --output "
                 "runs/best/eval-testing\n"
                 "  brainray evaluate --model s3://b/runs/best --data s3://b/Testing --output "
                 "s3://b/eval --shortcut-check\n")
    p.add_argument("--model", required=True, help="run directory or checkpoint (model.pt) URI")
    p.add_argument("--data", required=True, help="labeled folder (one sub-folder per class) or "
                                                 "CSV/Parquet manifest")
    p.add_argument("--output", required=True, help="directory URI for metrics.json and plots")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch")
    p.add_argument("--num-actors", type=int, default=1, help="inference actors (model copies)")
    p.add_argument("--shortcut-check", action="store_true",
                   help="also evaluate brain-only and background-only versions of the images; "
                        "flags a model that classifies from the background")
    _add_cluster_flags(p)
    _add_storage_flags(p)


def _score_parser(sub) -> None:
    p = _command(sub, "score", "score image archives into a Parquet dataset, exactly once",
                 "Classify every image in folders, S3 prefixes, zip/tar archives and DICOM files "
                 "into <output>/scores/ (Parquet: predicted class, confidence, per-class "
                 "probabilities, review and out-of-distribution flags, model id). Incremental: "
                 "a nightly run scores only what this model has not scored yet.",
                 "  brainray score --model runs/best --input /archive/2026-11 --output "
                 "/data/scores\n"
                 "  brainray score --model s3://b/runs/best --input s3://pacs-export/ --output "
                 "s3://b/scores --concurrency 4\n")
    d = ScoreConfig.__dataclass_fields__
    p.add_argument("--model", required=True, help="run directory or checkpoint (model.pt) URI")
    p.add_argument("--input", action="append", required=True, dest="inputs",
                   help="folder, S3 prefix or file (JPEG/PNG, DICOM, zip/tar); repeatable")
    p.add_argument("--output", required=True,
                   help="dataset URI; rows go to <output>/scores/, committed atomically per run")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="images per inference call")
    p.add_argument("--concurrency", type=int, default=d["concurrency"].default,
                   help="inference actors (model copies); one GPU each with GPUs")
    p.add_argument("--num-gpus-per-actor", type=float, default=d["num_gpus_per_actor"].default,
                   help="GPUs per inference actor when GPUs are used (fractions share a GPU)")
    p.add_argument("--threads-per-actor", type=int, default=d["threads_per_actor"].default,
                   help="torch threads per CPU actor; 0 = the node's cores / actors")
    p.add_argument("--confidence-threshold", type=float,
                   default=d["confidence_threshold"].default,
                   help="rows whose top probability is below this get needs_review = true "
                        "(default: the review threshold stored in the checkpoint, chosen on "
                        "validation at training time; 0.7 for older checkpoints)")
    p.add_argument("--no-ood-check", dest="ood_check", action="store_false",
                   help="do not flag inputs that are clearly not brain MRI (colour, blank, "
                        "documents) as out_of_distribution")
    p.add_argument("--explain-review-dir", default=None,
                   help="folder URI: write a Grad-CAM overlay <content_sha256>[-f<frame>].png "
                        "for every row with needs_review = true")
    p.add_argument("--rescore", dest="incremental", action="store_false",
                   help="score every input again, even those this model already scored "
                        "(adds rows; default is incremental)")
    p.add_argument("--files-per-task", type=int, default=d["files_per_task"].default,
                   help="input files read per Ray Data task (on CPU at least --batch-size: "
                        "fewer, fuller tasks)")
    p.add_argument("--rows-per-file", type=int, default=d["rows_per_file"].default,
                   help="target rows per output Parquet file")
    p.add_argument("--lease-ttl-s", type=float, default=d["lease_ttl_s"].default,
                   help="a run holds the output for this long past its last renewal (every "
                        "third of it): a run that dies frees the output after at most this")
    _add_cluster_flags(p)
    _add_storage_flags(p)


def _report_parser(sub) -> None:
    p = _command(sub, "report", "one HTML page about a scoring output",
                 "Write one self-contained HTML page about the output of `brainray score` "
                 "(open\nit in any browser or mail it): rows per predicted class, review and\n"
                 "out-of-distribution rates, error reasons with counts, a confidence histogram\n"
                 "and every committed run. Only committed rows are read (the files that\n"
                 "<output>/_manifest.json names), so a run still scoring is not counted. Runs\n"
                 "here, without Ray.",
                 "  brainray report s3://my-bucket/scores          # writes "
                 "s3://my-bucket/scores/report.html\n"
                 "  brainray report scores --out /tmp/scores-report.html\n")
    p.add_argument("output", help="the scoring output (local path or s3://), as given to "
                                  "`brainray score --output`")
    p.add_argument("--out", default=None, metavar="URI",
                   help="file URI for the page (local path or s3://; default: "
                        "<output>/report.html)")
    _add_storage_flags(p)


def _explain_parser(sub) -> None:
    p = _command(sub, "explain", "Grad-CAM heatmap overlays (PNG) for chosen images",
                 "Write, per image, a PNG of the input beside its Grad-CAM heatmap (where the "
                 "model looked), captioned with the probabilities, plus explanations.csv.",
                 "  brainray explain --model runs/best --input /data/cases/ --output "
                 "runs/best/explain\n"
                 "  brainray explain --model runs/best --input chosen.txt --output s3://b/explain "
                 "--target-class glioma\n")
    d = ExplainConfig.__dataclass_fields__
    p.add_argument("--model", required=True, help="run directory or checkpoint (model.pt) URI")
    p.add_argument("--input", action="append", required=True, dest="inputs",
                   help="folder, S3 prefix, image/DICOM/archive file, or a .txt/.lst file "
                        "listing URIs (one per line); repeatable")
    p.add_argument("--output", required=True,
                   help="folder URI for the overlay PNGs and explanations.csv")
    p.add_argument("--target-class", default=None,
                   help="class name (or index) to explain (default: each image's predicted "
                        "class)")
    p.add_argument("--max-images", type=int, default=d["max_images"].default,
                   help="stop after this many images")
    _add_storage_flags(p)


def _export_parser(sub) -> None:
    p = _command(sub, "export", "TorchScript, torch.export (and ONNX if installed) with "
                                "calibration",
                 "Export a trained model for use without brainray: model.ts (TorchScript), "
                 "model.pt2 (torch.export), model.onnx (with the onnx extra) and export.json; "
                 "each outputs calibrated probabilities.",
                 "  brainray export --model runs/best --output runs/best/export\n")
    p.add_argument("--model", required=True, help="run directory or checkpoint (model.pt) URI")
    p.add_argument("--output", required=True, help="folder URI for model.ts, model.pt2, "
                                                   "model.onnx and export.json")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="TorchScript and torch.export only, even when the onnx package is "
                        "installed")
    _add_storage_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainray", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and run a brain-MRI tumor classifier (glioma, meningioma, notumor, "
                    "pituitary) as Ray batch jobs, locally or on a Ray cluster.\n"
                    "Research software: not for diagnosis.",
        epilog="start here:\n"
               "  brainray train                       # a demo run on the embedded sample\n"
               "  brainray train --data /data/Training # the default recipe on your data\n"
               "  brainray score --model runs/<run> --input /archive --output /data/scores\n"
               "each command has --help with its flags and examples")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _tune_parser(sub)
    _evaluate_parser(sub)
    _score_parser(sub)
    _report_parser(sub)
    _explain_parser(sub)
    _export_parser(sub)
    return parser


def _storage(args):
    from brainray.storage import storage_options

    return storage_options(args.s3_endpoint, args.s3_region)


def _recipe_fields(args) -> dict:
    """The recipe's fields with every flag given on the command line in place of its value."""
    fields = dict(RECIPES[args.recipe])
    for dest, field_name in _RECIPE_FLAGS:
        if getattr(args, dest) is not None:
            fields[field_name] = getattr(args, dest)
    if args.data is None and args.epochs is None:
        fields["epochs"] = SAMPLE_EPOCHS  # the embedded sample is a demonstration
    return fields


def train_config(args) -> TrainConfig:
    from brainray.data import sample_data_dir

    run_dir = args.run_dir or os.path.join(
        "runs", dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    recipe = _recipe_fields(args)
    image_size = recipe.pop("image_size")
    return TrainConfig(
        data=args.data or sample_data_dir(), run_dir=run_dir, test_data=args.test_data,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        recipe=args.recipe, **recipe, weights=args.weights,
        backbone_lr_factor=args.backbone_lr_factor, shuffle_buffer_images=args.shuffle_buffer,
        num_workers=args.num_workers, use_gpu=bool(args.use_gpu),
        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        torch_threads=args.torch_threads, precision=args.precision, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        dedup_max_hamming=args.dedup_max_hamming,
        dedup_min_similarity=args.dedup_min_similarity, max_failures=args.max_failures,
        resource_wait_s=args.resource_wait_s, placement_strategy=args.placement_strategy,
        preprocess=PreprocessConfig(image_size=image_size), storage=_storage(args),
        target_accuracy=args.target_accuracy,
        mlflow_tracking_uri=args.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        mlflow_experiment=args.mlflow_experiment,
        mlflow_registered_model=args.mlflow_register_model)


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute: Tune runs each trial in a working directory of its own."""
    from brainray.storage import is_local

    return os.path.abspath(uri) if uri is not None and is_local(uri) else uri


def search_config(args) -> SearchConfig:
    return SearchConfig(
        data=_absolute(args.data), output=_absolute(args.output),
        test_data=_absolute(args.test_data), trials=args.trials, space=_absolute(args.space),
        recipe=args.recipe, epochs=args.epochs, grace_epochs=args.grace_epochs,
        max_concurrent_trials=args.max_concurrent_trials, seed=args.seed,
        num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
        use_gpu=bool(args.use_gpu), storage=_storage(args))


def eval_config(args) -> EvalConfig:
    return EvalConfig(model=args.model, data=args.data, output=args.output,
                      batch_size=args.batch_size, num_actors=args.num_actors,
                      use_gpu=bool(args.use_gpu), storage=_storage(args),
                      shortcut_check=args.shortcut_check)


def score_config(args) -> ScoreConfig:
    return ScoreConfig(
        model=args.model, inputs=tuple(args.inputs), output=args.output,
        batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=bool(args.use_gpu),
        num_gpus_per_actor=args.num_gpus_per_actor, threads_per_actor=args.threads_per_actor,
        confidence_threshold=args.confidence_threshold, incremental=args.incremental,
        files_per_task=args.files_per_task, rows_per_file=args.rows_per_file,
        storage=_storage(args), ood_check=args.ood_check, lease_ttl_s=args.lease_ttl_s,
        explain_review_dir=args.explain_review_dir)


def report_config(args) -> ReportConfig:
    return ReportConfig(output=args.output, out=args.out, storage=_storage(args))


def explain_config(args) -> ExplainConfig:
    return ExplainConfig(model=args.model, inputs=tuple(args.inputs), output=args.output,
                         target_class=args.target_class, max_images=args.max_images,
                         storage=_storage(args))


def export_config(args) -> ExportConfig:
    return ExportConfig(model=args.model, output=args.output, onnx=args.onnx,
                        storage=_storage(args))


_CONFIGS = {"train": train_config, "tune": search_config, "evaluate": eval_config,
            "score": score_config, "report": report_config, "explain": explain_config,
            "export": export_config}
# Commands that run on the driver alone: no Ray cluster is started or joined.
_WITHOUT_RAY = ("report", "explain", "export")


# command -> (module, function) of the job. Imported when the command runs, not at import time,
# so that `brainray --help` stays fast.
_JOBS = {"train": ("brainray.train", "run_training"), "tune": ("brainray.search", "run_search"),
         "evaluate": ("brainray.evaluate", "run_evaluation"),
         "report": ("brainray.score_report", "run_report"),
         "explain": ("brainray.explain", "run_explain"),
         "export": ("brainray.export", "run_export"), "score": ("brainray.score", "run_scoring")}


def _job_function(command: str):
    """The job's entry function, its modules imported now. For Ray jobs this happens before Ray
    starts: inside a `ray job submit` job Ray may unpack the working_dir again once the job's
    first worker starts, and an import reaching into that folder at that moment fails."""
    module, function = _JOBS[command]
    return getattr(importlib.import_module(module), function)


def _run_job(command: str, config) -> None:
    _job_function(command)(config)


def init_ray(address: str | None, use_gpu: bool | None,
             env_vars: dict[str, str] | None = None) -> tuple[bool, object]:
    """Connect to the cluster (or start a local one); resolve --use-gpu's auto default from what
    the cluster has or can have. Returns (use_gpu, the cluster view)."""
    import ray

    from brainray import cluster
    from brainray.console import say
    from brainray.runtime_env import tune_this_process, worker_env_vars

    if not ray.is_initialized():
        env_vars = {**worker_env_vars(), **(env_vars or {})}
        tune_this_process()
        cwd = os.getcwd()
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), configure_logging=False,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
        _reenter(cwd)
    view = cluster.current_view()
    gpu = cluster.use_gpu(use_gpu, view)
    say(f"cluster: {view.alive_nodes} node(s) alive; {cluster.describe(view, gpu)}")
    return gpu, view


def _reenter(cwd: str) -> None:
    """Inside a Ray job, the job's runtime environment (our env_vars on top of the job's own) can
    make Ray unpack the job's working_dir again, deleting and recreating the folder the driver
    runs in: the process is then left in a deleted directory (os.getcwd() fails, as torch's
    import does). Step back into the recreated one."""
    try:
        same = os.path.samestat(os.stat("."), os.stat(cwd))
    except FileNotFoundError:
        return
    if not same:
        os.chdir(cwd)


def _output_uri(command: str, config) -> str:
    return config.run_dir if command == "train" else config.output


# The URIs each command reads or writes on the workers: (config field, its flag).
_SHARED_PATHS = {
    "train": (("data", "--data"), ("test_data", "--test-data"), ("run_dir", "--run-dir"),
              ("weights", "--weights")),
    "tune": (("data", "--data"), ("test_data", "--test-data"), ("output", "--output"),
             ("space", "--space")),
    "evaluate": (("model", "--model"), ("data", "--data"), ("output", "--output")),
    "score": (("model", "--model"), ("inputs", "--input"), ("output", "--output"),
              ("explain_review_dir", "--explain-review-dir")),
}


def _job_env_vars(config) -> dict[str, str]:
    """Settings the job's Ray processes need from its config: how long Ray Train waits for its
    workers' resources (GPU nodes an autoscaler starts on demand take minutes)."""
    wait = getattr(config, "resource_wait_s", None)
    if wait is None or "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in os.environ:
        return {}
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(wait)}


def check_paths_shared(command: str, config, view) -> None:
    """When work may run on another node, every path it reads or writes must be shared storage:
    a local input would be missing there (and become error rows that incremental runs then
    skip forever), a local output would scatter over the nodes' disks."""
    from brainray import cluster
    from brainray.storage import is_local

    if not cluster.is_multi_node(view):
        return
    for field_name, flag in _SHARED_PATHS.get(command, ()):
        value = getattr(config, field_name)
        for uri in (value if isinstance(value, tuple) else (value,)):
            if uri and uri != "imagenet" and is_local(uri):
                raise ValueError(
                    f"{flag} {uri!r} is a local path, but this cluster can run the job's work "
                    f"on other nodes ({view.alive_nodes} alive" + (", more can be launched"
                                                                  if view.can_add_nodes else "")
                    + "), which cannot see this machine's files: use s3://")


def _root_cause(exc: BaseException) -> BaseException:
    """The user-code error inside Ray's wrappers (RayTaskError -> UserCodeException -> cause),
    whose message names the file or URI, rather than the wrapper's `ray::MapWorker(...)` line."""
    for _ in range(10):
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc or not type(exc).__module__.startswith("ray"):
            break
        exc = inner
    return exc


def _fail(command: str, exc: BaseException) -> None:
    from brainray.storage import redact

    if os.environ.get("BRAINRAY_DEBUG"):
        traceback.print_exception(exc)
    exc = _root_cause(exc)
    message = redact(str(exc)).strip().splitlines()
    reason = message[0] if message else type(exc).__name__
    print(f"brainray {command}: error: {reason}", file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A bad flag value fails here, before Ray starts.
        config = _CONFIGS[args.command](args)
    except ValueError as exc:
        _fail(args.command, exc)
        return 2
    try:
        if args.command in _WITHOUT_RAY:
            _run_job(args.command, config)
        else:
            _run_ray_job(args, config)
    except Exception as exc:  # the job's last word must be one readable line
        _fail(args.command, exc)
        return 1
    return 0


def _log_files(command: str, config, verbose: bool) -> tuple[str | None, str | None]:
    """(local file Ray's output is written to, URI it is copied to afterwards): the output's
    logs/ folder, through a local file when the output is on S3; (None, None) with --verbose."""
    from brainray import storage

    if verbose:
        return None, None
    output = _output_uri(command, config)
    name = f"{command}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.log"
    if storage.is_local(output):
        return storage.join(output, "logs", name), None
    return os.path.join(tempfile.mkdtemp(prefix="brainray-log-"), name), storage.join(
        output, "logs", name)


def _run_ray_job(args, config) -> None:
    """Connect to (or start) Ray and run the job, Ray's own output going to the log file."""
    import ray

    from brainray import storage
    from brainray.console import captured

    job = _job_function(args.command)
    local_log, remote_log = _log_files(args.command, config, args.verbose)
    ours = not ray.is_initialized()  # a caller's Ray (a notebook, a test) is left running
    try:
        with captured(local_log) as out:
            if local_log:
                out.line(f"Ray's own output goes to {storage.redact(remote_log or local_log)}")
            try:
                gpu, view = init_ray(args.address, args.use_gpu, _job_env_vars(config))
                config = dataclasses.replace(config, use_gpu=gpu)
                check_paths_shared(args.command, config, view)
                job(config)
            finally:
                if ours:  # flushes the workers' last forwarded lines into the log, too
                    ray.shutdown()
    finally:
        if remote_log:
            _copy_log(local_log, remote_log, config.storage)


def _copy_log(local_log: str, remote_log: str, options) -> None:
    """Copy the local log of an S3 output to the output, then drop its temp folder (a nightly
    job must not leave one behind every night)."""
    from brainray import storage
    from brainray.console import say

    try:
        if os.path.exists(local_log):
            storage.copy_file(local_log, remote_log, options)  # streamed: a log can be large
    except storage.StorageError as exc:  # the job's own outcome matters more; keep the file
        say(f"warning: cannot copy Ray's log to {storage.redact(remote_log)} ({exc}); "
            f"it stays at {local_log}")
        return
    shutil.rmtree(os.path.dirname(local_log), ignore_errors=True)


def main() -> None:
    sys.exit(run())
