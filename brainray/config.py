"""Frozen configuration of each job, the class list and the column names shared by all modules.

Configs are plain data: the CLI builds them, jobs print them at start and save them with the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from brainray.split import DEFAULT_MAX_HAMMING

DEFAULT_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

# Column names of the Ray Data pipeline, named once so producers and consumers cannot drift.
COL_PATH = "path"
COL_BYTES = "bytes"
COL_IMAGE = "image"
COL_LABEL = "label"
COL_LABEL_NAME = "label_name"
COL_SHA256 = "sha256"
COL_FINGERPRINT = "fingerprint"
COL_THUMBNAIL = "thumbnail"  # 32x32 grayscale, for the nearest-neighbour baseline
COL_ERROR = "error"
COL_SPLIT = "split"
COL_GROUP = "group"
COL_PROBS = "probs"  # per-class probabilities of labeled predictions (brainray.predict)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "gif", "webp")

# paper_cnn, bn_cnn and res_cnn are brainray's (brainray.model); the rest are torchvision's
# builders (brainray.backbones), trained from scratch or fine-tuned from --weights.
TORCHVISION_MODELS: tuple[str, ...] = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny")
MODEL_NAMES: tuple[str, ...] = ("paper_cnn", "bn_cnn", "res_cnn", *TORCHVISION_MODELS)
# The size arguments each architecture lets a run set (TrainConfig.width / depth).
ARCHITECTURE_KEYS: dict[str, tuple[str, ...]] = {
    "paper_cnn": (), "bn_cnn": ("width",), "res_cnn": ("width", "depth"),
    **{name: () for name in TORCHVISION_MODELS}}
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "bf16-stem")
AUGMENT_LEVELS: tuple[str, ...] = ("paper", "medium", "light", "none")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "onecycle", "constant")
TTA_MODES: tuple[str, ...] = ("none", "hflip")
PLACEMENT_STRATEGIES: tuple[str, ...] = ("PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(frozen=True)
class PreprocessConfig:
    """Deterministic preprocessing; stored in every checkpoint so scoring matches training."""

    image_size: int = 224
    max_image_pixels: int = 64_000_000  # refuse decompression bombs before decoding

    def __post_init__(self) -> None:
        if not 1 <= self.image_size <= 4096:
            raise ValueError(f"image size must be between 1 and 4096 pixels, not {self.image_size}")
        if self.max_image_pixels < 1:
            raise ValueError("max image pixels must be >= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only random augmentation, applied per image on top of the preprocessing."""

    rotation_deg: float = 30.0
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    zoom_min: float = 0.85  # <1 zooms out (image shrinks, border padded), >1 crops in
    zoom_max: float = 1.15
    translate_fraction: float = 0.05
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2

    @classmethod
    def preset(cls, level: str) -> AugmentConfig | None:
        if level == "none":
            return None
        if level == "light":
            return cls(rotation_deg=10.0, vflip_prob=0.0, zoom_min=0.95, zoom_max=1.05,
                       translate_fraction=0.03, brightness=0.1, contrast=0.1)
        if level == "medium":
            return cls(rotation_deg=15.0, vflip_prob=0.0, zoom_min=0.9, zoom_max=1.1,
                       translate_fraction=0.05, brightness=0.15, contrast=0.15)
        if level == "paper":
            return cls()
        raise ValueError(f"unknown augmentation level {level!r}; choose one of {AUGMENT_LEVELS}")


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Credentials never live here: they come from the AWS chain."""

    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO/moto; None = AWS
    s3_region: str | None = None


# Named training recipes (`brainray train --recipe NAME`). Each sets every field below (image_size
# is preprocess.image_size); a flag given on the command line still overrides it. "default" is
# the best recipe of the study in the README (Results) and TrainConfig's defaults; "paper" is the
# paper's setup: its CNN at 224 px, its augmentation, Adam at Keras' default 1e-3, constant rate,
# early stopping.
RECIPES: dict[str, dict] = {
    "default": {"model": "bn_cnn", "image_size": 128, "width": None, "depth": None,
                "augment": "light", "epochs": 45, "patience": 15, "batch_size_per_worker": 32,
                "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "warmup_epochs": 1,
                "lr_schedule": "cosine", "label_smoothing": 0.0, "ema_decay": 0.0,
                "tta": "none"},
    "paper": {"model": "paper_cnn", "image_size": 224, "width": None, "depth": None,
              "augment": "paper", "epochs": 30, "patience": 6, "batch_size_per_worker": 32,
              "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0,
              "lr_schedule": "constant", "label_smoothing": 0.0, "ema_decay": 0.0,
              "tta": "none"},
}
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)
_DEFAULT = RECIPES["default"]


def _default_preprocess() -> PreprocessConfig:
    return PreprocessConfig(image_size=_DEFAULT["image_size"])


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Saved as config.json in the run directory.

    The defaults are the "default" recipe (RECIPES).
    """

    data: str  # folder URI (one sub-folder per class) or a CSV/Parquet manifest with path,label
    run_dir: str  # local path or s3:// prefix; relaunching with the same run_dir resumes
    test_data: str | None = None  # held-out labeled data; otherwise a test split is carved out
    classes: tuple[str, ...] = DEFAULT_CLASSES
    recipe: str = "default"  # the RECIPES entry the fields below started from
    model: str = _DEFAULT["model"]
    width: int | None = _DEFAULT["width"]  # channels of the first stage (bn_cnn, res_cnn)
    depth: int | None = _DEFAULT["depth"]  # residual blocks per stage (res_cnn)
    weights: str | None = None  # initial weights of a torchvision model: "imagenet" or a URI
    backbone_lr_factor: float = 0.1  # with weights: backbone lr = lr x this (the head gets lr)
    epochs: int = _DEFAULT["epochs"]
    batch_size_per_worker: int = _DEFAULT["batch_size_per_worker"]
    optimizer: str = _DEFAULT["optimizer"]  # "adam" (L2 weight decay) or "adamw" (decoupled)
    lr: float = _DEFAULT["lr"]
    weight_decay: float = _DEFAULT["weight_decay"]
    warmup_epochs: int = _DEFAULT["warmup_epochs"]
    lr_schedule: str = _DEFAULT["lr_schedule"]  # after warm-up: cosine to 0, one-cycle, constant
    label_smoothing: float = _DEFAULT["label_smoothing"]  # training loss only
    ema_decay: float = _DEFAULT["ema_decay"]  # 0 = off; else validate and keep the weights' EMA
    tta: str = _DEFAULT["tta"]  # test-time augmentation at inference: "none" or "hflip"
    patience: int = _DEFAULT["patience"]  # epochs without val-loss improvement before stopping
    shuffle_buffer_images: int = 1000  # per-worker local shuffle buffer (x 50 KB at 224 px)
    augment: str = _DEFAULT["augment"]
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; 0.5 puts two workers on one GPU
    torch_threads: int = 0  # 0 = auto: the node's cores shared among its workers
    precision: str = "auto"  # brainray.precision: fp16 AMP on GPU, fp32 on CPU
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    dedup_max_hamming: int = DEFAULT_MAX_HAMMING
    # > 0: also link images whose 32x32 thumbnails have at least this cosine similarity
    # (brainray.split.link_similar), a stricter grouping than the perceptual hash alone
    dedup_min_similarity: float = 0.0
    max_failures: int = 2
    # how long the workers may wait for their resources (e.g. GPU nodes an autoscaler launches)
    # before the run fails with a clear reason instead of waiting forever
    resource_wait_s: float = 600.0
    placement_strategy: str = "PACK"  # of the workers over nodes: PACK, SPREAD, STRICT_SPREAD
    preprocess: PreprocessConfig = field(default_factory=_default_preprocess)
    storage: StorageOptions = field(default_factory=StorageOptions)
    # abstention: the review threshold is chosen on validation for this accepted-set accuracy
    target_accuracy: float = 0.99
    # experiment tracking (brainray.tracking); TensorBoard events are always written
    mlflow_tracking_uri: str | None = None  # e.g. http://mlflow:5000 or sqlite:///mlflow.db
    mlflow_experiment: str = "brainray"
    mlflow_registered_model: str | None = None  # register model.pt under this name

    @property
    def architecture(self) -> dict:
        """The model's size arguments that this run sets (brainray.model.build_model)."""
        return {k: v for k, v in (("width", self.width), ("depth", self.depth)) if v is not None}

    def __post_init__(self) -> None:
        checks = [
            (self.recipe in RECIPES, f"recipe must be one of {RECIPE_NAMES}"),
            (self.model in MODEL_NAMES, f"model must be one of {MODEL_NAMES}"),
            (set(self.architecture) <= set(ARCHITECTURE_KEYS.get(self.model, ())),
             f"model {self.model} takes only {ARCHITECTURE_KEYS.get(self.model) or 'no'} "
             "size arguments (--width, --depth)"),
            (all(1 <= v <= 1024 for v in self.architecture.values()),
             "width and depth must be in [1, 1024]"),
            (self.weights is None or self.model in TORCHVISION_MODELS,
             f"--weights needs a torchvision model ({', '.join(TORCHVISION_MODELS)})"),
            (self.augment in AUGMENT_LEVELS, f"augment must be one of {AUGMENT_LEVELS}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.tta in TTA_MODES, f"tta must be one of {TTA_MODES}"),
            (0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "EMA decay must be in [0, 1) (0 = off)"),
            (0 < self.backbone_lr_factor <= 1, "backbone lr factor must be in (0, 1]"),
            (0 <= self.dedup_min_similarity <= 1, "dedup min similarity must be in [0, 1]"),
            (self.warmup_epochs >= 0, "warmup epochs must be >= 0"),
            (self.resource_wait_s > 0, "resource wait must be > 0 seconds"),
            (0 < self.gpus_per_worker <= 8, "GPUs per worker must be in (0, 8]"),
            (self.placement_strategy in PLACEMENT_STRATEGIES,
             f"placement strategy must be one of {PLACEMENT_STRATEGIES}"),
            (self.mlflow_registered_model is None or self.mlflow_tracking_uri is not None,
             "--mlflow-register-model needs --mlflow-tracking-uri (or MLFLOW_TRACKING_URI)"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.preprocess.image_size >= 8, "image size must be >= 8 pixels to train"),
            (self.batch_size_per_worker >= 1, "batch size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.patience >= 1, "patience must be >= 1"),
            (self.shuffle_buffer_images >= 1, "shuffle buffer must be >= 1 image"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (len(set(self.classes)) == len(self.classes) >= 2, "classes must be >= 2 unique names"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (0 <= self.test_fraction < 1, "test_fraction must be in [0, 1)"),
            (self.test_fraction > 0 or self.test_data is not None,
             "test_fraction must be > 0 unless test_data is given"),
            (self.val_fraction + self.test_fraction < 1, "val + test fractions must be < 1"),
            (0 < self.target_accuracy <= 1, "target accuracy must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def recipe_overrides(self) -> dict:
        """The recipe fields this run sets differently from its recipe (flags given)."""
        values = {**to_dict(self), "image_size": self.preprocess.image_size}
        return {k: values[k] for k, v in RECIPES[self.recipe].items() if values[k] != v}

    @property
    def split_fractions(self) -> dict[str, float]:
        if self.test_data is not None:
            return {"train": 1.0 - self.val_fraction, "val": self.val_fraction}
        train = 1.0 - self.val_fraction - self.test_fraction
        return {"train": train, "val": self.val_fraction, "test": self.test_fraction}


# What a search space may vary (`brainray tune --space`): the recipe's fields.
SEARCHABLE_FIELDS: tuple[str, ...] = tuple(RECIPES["default"])
SPACE_KINDS: tuple[str, ...] = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SearchConfig:
    """A hyperparameter search (`brainray tune`): trials of the training run, on Ray Tune."""

    data: str
    output: str  # trials/<id>/ (each a full run dir), the Tune experiment, trials.parquet
    trials: int = 8
    space: str | None = None  # YAML file URI; None = brainray.search.DEFAULT_SPACE
    recipe: str = "default"  # fields the space does not vary come from this recipe
    epochs: int = 15  # each trial's epoch budget; ASHA stops weak trials before it
    grace_epochs: int = 3  # ASHA never stops a trial before this many epochs
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs (or GPUs) hold
    seed: int = 0  # the split's and the search's: every trial sees the same split
    test_data: str | None = None
    num_workers: int = 1  # per trial
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        checks = [(self.trials >= 1, "trials must be >= 1"),
                  (self.epochs >= 1, "epochs must be >= 1"),
                  (1 <= self.grace_epochs, "grace epochs must be >= 1"),
                  (self.max_concurrent_trials >= 0, "max concurrent trials must be >= 0"),
                  (self.recipe in RECIPES, f"recipe must be one of {RECIPE_NAMES}"),
                  (self.num_workers >= 1, "num_workers must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of a trained checkpoint on labeled data."""

    model: str  # checkpoint file URI or run directory URI
    data: str
    output: str
    batch_size: int = 64
    num_actors: int = 1
    use_gpu: bool = False
    storage: StorageOptions = field(default_factory=StorageOptions)
    shortcut_check: bool = False  # also evaluate brain-only and background-only images


@dataclass(frozen=True)
class ScoreConfig:
    """Batch scoring of image archives into a Parquet dataset."""

    model: str  # checkpoint file URI or run directory URI
    inputs: tuple[str, ...]  # folders, prefixes or single files (images, DICOM, zip/tar)
    output: str  # dataset root: scores/ plus the commit manifest
    batch_size: int = 64  # images per inference call
    concurrency: int = 1  # inference actors (model copies)
    use_gpu: bool = False
    num_gpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # 0 = this node's cores / actors (CPU inference)
    # below this a row gets needs_review = true; None = the checkpoint's review threshold
    # (chosen on validation at training time), else 0.7
    confidence_threshold: float | None = None
    incremental: bool = True  # skip files already scored by the same model
    files_per_task: int = 16  # input files per read task
    rows_per_file: int = 50_000  # target Parquet rows per output file
    max_file_bytes: int = 2 * 1024**3  # larger files become error rows, unread
    storage: StorageOptions = field(default_factory=StorageOptions)
    ood_check: bool = True  # flag inputs that are clearly not brain MRI (brainray.ood)
    # a run holds the output's lease (brainray.lease) for this long past its last renewal
    lease_ttl_s: float = 300.0
    explain_review_dir: str | None = None  # Grad-CAM overlays of needs_review rows go here

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError("confidence threshold must be in [0, 1]")
        if min(self.batch_size, self.concurrency, self.files_per_task, self.rows_per_file) < 1:
            raise ValueError("batch size, concurrency, files per task and rows per file "
                             "must be >= 1")


@dataclass(frozen=True)
class ExplainConfig:
    """Grad-CAM overlays for chosen images (runs on the driver; no Ray)."""

    model: str  # checkpoint file URI or run directory URI
    inputs: tuple[str, ...]  # folders, prefixes, single files, or .txt/.lst lists of URIs
    output: str  # folder URI for the PNGs and explanations.csv
    target_class: str | None = None  # class name or index; None = the predicted class
    max_images: int = 200
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("give at least one --input")
        if self.max_images < 1:
            raise ValueError("max images must be >= 1")


@dataclass(frozen=True)
class ExportConfig:
    """TorchScript, torch.export (and ONNX when installed) export of a checkpoint with its
    temperature."""

    model: str  # checkpoint file URI or run directory URI
    output: str  # folder URI
    onnx: bool = True  # also ONNX, if the onnx package is installed
    storage: StorageOptions = field(default_factory=StorageOptions)


@dataclass(frozen=True)
class ReportConfig:
    """The HTML page of a scoring output (`brainray report`; runs on the driver, no Ray)."""

    output: str  # the scoring output (brainray.publish's layout)
    out: str | None = None  # file URI of the page; None = <output>/report.html
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("give the scoring output to report on")


def to_dict(config) -> dict:
    """Plain-JSON view of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def to_json(config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)
