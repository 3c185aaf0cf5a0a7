"""Command line: `brainray train|evaluate|score|explain|export`. Flags become frozen configs.

`ray.init` lives only here; explain and export run on the driver without Ray.

Exit status 0 on success; on failure a one-line reason on stderr and status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
import traceback

from brainray.config import (
    AUGMENT_LEVELS,
    DEFAULT_CLASSES,
    MODEL_NAMES,
    PRECISIONS,
    EvalConfig,
    ExplainConfig,
    ExportConfig,
    PreprocessConfig,
    ScoreConfig,
    TrainConfig,
)

SAMPLE_EPOCHS = 5


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


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier; with no flags, on the embedded sample",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig.__dataclass_fields__
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
    m = p.add_argument_group("model and optimisation")
    m.add_argument("--model", choices=MODEL_NAMES, default=d["model"].default,
                   help="paper_cnn: the paper's network; bn_cnn: batch-norm + global pooling")
    m.add_argument("--epochs", type=int, default=None,
                   help=f"maximum epochs (default {d['epochs'].default}; {SAMPLE_EPOCHS} on the "
                        "embedded sample, a quick demonstration)")
    m.add_argument("--batch-size", type=int, default=d["batch_size_per_worker"].default,
                   help="images per batch per worker")
    m.add_argument("--lr", type=float, default=d["lr"].default, help="peak Adam learning rate")
    m.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    m.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"].default,
                   help="epochs of linear learning-rate warm-up")
    m.add_argument("--lr-schedule", choices=("cosine", "constant"),
                   default=d["lr_schedule"].default, help="after warm-up")
    m.add_argument("--patience", type=int, default=d["patience"].default,
                   help="early stopping: epochs without validation-loss improvement")
    m.add_argument("--shuffle-buffer", type=int, default=d["shuffle_buffer_images"].default,
                   help="images per worker in the local shuffle buffer, drawn in a new order "
                        "every epoch (the train split is also shuffled once)")
    m.add_argument("--augment", choices=AUGMENT_LEVELS, default=d["augment"].default,
                   help="paper: rotation 30 deg, h/v flips, zoom/crop, brightness/contrast 0.2")
    m.add_argument("--precision", choices=PRECISIONS, default=d["precision"].default,
                   help="auto: fp16 AMP on GPU, fp32 on CPU; bf16-stem: bf16 for paper_cnn's first "
                        "block only (faster on CPUs with native bf16; README, Performance)")
    m.add_argument("--image-size", type=int, default=PreprocessConfig.image_size,
                   help="images are resized to this square size in pixels")
    m.add_argument("--seed", type=int, default=d["seed"].default,
                   help="seeds the split, shuffling, augmentation and initialisation")
    s = p.add_argument_group("split")
    s.add_argument("--val-fraction", type=float, default=d["val_fraction"].default)
    s.add_argument("--test-fraction", type=float, default=d["test_fraction"].default)
    s.add_argument("--dedup-max-hamming", type=int, default=d["dedup_max_hamming"].default,
                   help="images whose 64-bit perceptual hashes differ in at most this many bits "
                        "are near-duplicates and stay in one split")
    c = p.add_argument_group("workers")
    c.add_argument("--num-workers", type=int, default=d["num_workers"].default,
                   help="Ray Train (DDP) workers")
    c.add_argument("--cpus-per-worker", type=float, default=d["cpus_per_worker"].default,
                   help="CPUs reserved per worker; also its torch thread count")
    c.add_argument("--torch-threads", type=int, default=d["torch_threads"].default,
                   help="intra-op threads per worker; 0 = the node's cores / its workers")
    c.add_argument("--max-failures", type=int, default=d["max_failures"].default,
                   help="restarts from the latest checkpoint after a worker dies")
    t = p.add_argument_group("calibration and abstention")
    t.add_argument("--target-accuracy", type=float, default=d["target_accuracy"].default,
                   help="the review threshold stored with the model is the smallest calibrated "
                        "confidence whose accepted validation images reach this accuracy")
    _add_cluster_flags(p)
    _add_storage_flags(p)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics and plots of a trained model on labeled data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p = sub.add_parser("score", help="score image archives into a Parquet dataset, exactly once",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    _add_cluster_flags(p)
    _add_storage_flags(p)


def _explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmap overlays (PNG) for chosen images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p = sub.add_parser("export", help="TorchScript (and ONNX if installed) with calibration",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="run directory or checkpoint (model.pt) URI")
    p.add_argument("--output", required=True, help="folder URI for model.ts, model.onnx and "
                                                   "export.json")
    p.add_argument("--no-onnx", dest="onnx", action="store_false",
                   help="TorchScript only, even when the onnx package is installed")
    _add_storage_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _evaluate_parser(sub)
    _score_parser(sub)
    _explain_parser(sub)
    _export_parser(sub)
    return parser


def _storage(args):
    from brainray.storage import storage_options

    return storage_options(args.s3_endpoint, args.s3_region)


def _epochs(args) -> int:
    if args.epochs is not None:
        return args.epochs
    return SAMPLE_EPOCHS if args.data is None else TrainConfig.epochs


def train_config(args) -> TrainConfig:
    from brainray.data import sample_data_dir

    run_dir = args.run_dir or os.path.join(
        "runs", dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    return TrainConfig(
        data=args.data or sample_data_dir(), run_dir=run_dir, test_data=args.test_data,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        model=args.model, epochs=_epochs(args), batch_size_per_worker=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
        lr_schedule=args.lr_schedule, patience=args.patience, augment=args.augment,
        shuffle_buffer_images=args.shuffle_buffer,
        num_workers=args.num_workers, use_gpu=bool(args.use_gpu),
        cpus_per_worker=args.cpus_per_worker, torch_threads=args.torch_threads,
        precision=args.precision, seed=args.seed,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        dedup_max_hamming=args.dedup_max_hamming, max_failures=args.max_failures,
        preprocess=PreprocessConfig(image_size=args.image_size), storage=_storage(args),
        target_accuracy=args.target_accuracy)


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
        storage=_storage(args), ood_check=args.ood_check,
        explain_review_dir=args.explain_review_dir)


def explain_config(args) -> ExplainConfig:
    return ExplainConfig(model=args.model, inputs=tuple(args.inputs), output=args.output,
                         target_class=args.target_class, max_images=args.max_images,
                         storage=_storage(args))


def export_config(args) -> ExportConfig:
    return ExportConfig(model=args.model, output=args.output, onnx=args.onnx,
                        storage=_storage(args))


_CONFIGS = {"train": train_config, "evaluate": eval_config, "score": score_config,
            "explain": explain_config, "export": export_config}
# Commands that run on the driver alone: no Ray cluster is started or joined.
_WITHOUT_RAY = ("explain", "export")


def _run_job(command: str, config) -> None:
    if command == "train":
        from brainray.train_job import run_training

        run_training(config)
    elif command == "evaluate":
        from brainray.evaluate import run_evaluation

        run_evaluation(config)
    elif command == "explain":
        from brainray.explain import run_explain

        run_explain(config)
    elif command == "export":
        from brainray.export import run_export

        run_export(config)
    else:
        from brainray.score import run_scoring

        run_scoring(config)


def init_ray(address: str | None, use_gpu: bool | None) -> bool:
    """Connect to the cluster (or start a local one); resolve --use-gpu's auto default."""
    import ray

    from brainray.runtime_env import tune_this_process, worker_env_vars

    if not ray.is_initialized():
        env_vars = worker_env_vars()
        tune_this_process()
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), configure_logging=False,
                 runtime_env={"env_vars": env_vars} if env_vars else None)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        print(f"GPUs {'found' if use_gpu else 'not found'} in the cluster: "
              f"{'using' if use_gpu else 'not using'} them", flush=True)
    return use_gpu


def _output_uri(command: str, config) -> str:
    return config.run_dir if command == "train" else config.output


def check_output_reachable(command: str, config, alive_nodes: int) -> None:
    """On a multi-node cluster a local output path would scatter files over the nodes' disks."""
    from brainray.storage import is_local

    uri = _output_uri(command, config)
    if alive_nodes > 1 and is_local(uri):
        raise ValueError(f"the cluster has {alive_nodes} nodes, so the output must be shared "
                         f"storage (s3://...), not the local path {uri!r}")


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


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
            return 0
        config = dataclasses.replace(config, use_gpu=init_ray(args.address, args.use_gpu))
        check_output_reachable(args.command, config, _alive_nodes())
        _run_job(args.command, config)
    except Exception as exc:  # the job's last word must be one readable line
        _fail(args.command, exc)
        return 1
    return 0


def main() -> None:
    sys.exit(run())
