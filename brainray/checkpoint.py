"""Checkpoints and run directories: the file names, and saving, loading and locating models.

A checkpoint is one dict of tensors and plain Python values (weights, architecture, class names,
preprocessing, config, metrics, and after training the calibration and guards), so
`torch.load(weights_only=True)` reads it and nothing else is needed to score. A run directory
holds the best one as model.pt beside the report; Ray Train's checkpoint directories hold the
latest and best epochs' model.pt and train_state.pt (optimizer, schedule, loop state) for resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch
from torch import nn

from brainray import storage
from brainray.config import MODEL_NAMES, TTA_MODES, PreprocessConfig, StorageOptions
from brainray.model import build_model, check_architecture, unwrap

CHECKPOINT_FORMAT = "brainray-checkpoint-v1"
_REQUIRED_FIELDS = ("model_name", "model_id", "classes", "preprocess", "state_dict")

# A run directory's files (brainray train; brainray evaluate writes the report files too).
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"  # in Ray Train's checkpoint directories only
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.parquet"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
MODEL_CARD_FILE = "MODEL_CARD.md"
CONFUSION_PNG, ACCURACY_PNG, LOSS_PNG = "confusion_matrix.png", "accuracy.png", "loss.png"
RELIABILITY_PNG, COVERAGE_PNG = "reliability.png", "coverage.png"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not match what the caller expects."""


def weights_id(state_dict: dict[str, torch.Tensor]) -> str:
    """A stable short hash of the weights: identifies the exact model that produced a score."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# Everything besides the weights that changes what a model outputs for an image: a model_id
# covers them all, so recalibrating (or any of these) makes a new model identity, and scoring
# never takes rows of the old one for rows of the new.
IDENTITY_FIELDS = ("model_name", "architecture", "classes", "preprocess", "temperature",
                   "review_threshold", "ood_reference", "test_time_augmentation")


def model_identity(checkpoint: dict) -> str:
    """The model_id of a checkpoint: a hash of its weights_id and its IDENTITY_FIELDS."""
    described = {k: checkpoint.get(k) for k in IDENTITY_FIELDS}
    text = json.dumps({"weights_id": checkpoint["weights_id"], **described}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_checkpoint(model: nn.Module, *, model_name: str, classes: list[str] | tuple[str, ...],
                    preprocess: PreprocessConfig, config: dict, metrics: dict,
                    epoch: int, architecture: dict | None = None, **fields) -> dict:
    """`fields`: further plain values (test_time_augmentation, initial_weights, ...)."""
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    checkpoint = {
        **fields,
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "architecture": check_architecture(model_name, architecture),
        "weights_id": weights_id(state),
        "classes": list(classes),
        "preprocess": {"image_size": preprocess.image_size,
                       "max_image_pixels": preprocess.max_image_pixels},
        "config": config,
        "metrics": metrics,
        "epoch": epoch,
        "state_dict": state,
    }
    return {**checkpoint, "model_id": model_identity(checkpoint)}


def serialize(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def deserialize(data: bytes, source: str = "checkpoint",
                expected_classes: list[str] | tuple[str, ...] | None = None) -> dict:
    """Load with weights_only=True (refuses pickled code) and validate what the file claims."""
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{source} cannot be loaded safely (weights_only=True): {reason}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} is not a brainray checkpoint ({CHECKPOINT_FORMAT})")
    missing = [k for k in _REQUIRED_FIELDS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} is an incomplete checkpoint: missing {missing}")
    if checkpoint["model_name"] not in MODEL_NAMES:
        raise CheckpointError(f"{source} names unknown model {checkpoint['model_name']!r}")
    try:
        check_architecture(checkpoint["model_name"], checkpoint.get("architecture"))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    if expected_classes is not None and list(expected_classes) != checkpoint["classes"]:
        raise CheckpointError(f"{source} was trained on classes {checkpoint['classes']}, "
                              f"not {list(expected_classes)}")
    _check_identity(checkpoint, source)
    return checkpoint


def _check_identity(checkpoint: dict, source: str) -> None:
    """The weights match their recorded hash and model_id matches what it covers. Checkpoints
    from before weights_id existed had model_id = the weights' hash, and are read as such."""
    weights = weights_id(checkpoint["state_dict"])
    if "weights_id" not in checkpoint:
        if weights != checkpoint["model_id"]:
            raise CheckpointError(f"{source}: weights do not match their recorded model_id")
        return
    if weights != checkpoint["weights_id"]:
        raise CheckpointError(f"{source}: weights do not match their recorded weights_id")
    if model_identity(checkpoint) != checkpoint["model_id"]:
        raise CheckpointError(f"{source}: model_id does not match the weights, calibration "
                              "and preprocessing it records")


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """An eval-mode model with the checkpoint's weights, on the CPU."""
    model = build_model(checkpoint["model_name"], len(checkpoint["classes"]),
                        checkpoint["preprocess"]["image_size"], checkpoint.get("architecture"))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def preprocess_config(checkpoint: dict) -> PreprocessConfig:
    return PreprocessConfig(**checkpoint["preprocess"])


# Optional fields added after training (calibration.py, ood.py). Checkpoints without them load
# and behave as before: temperature 1.0, the default review threshold, default OOD bounds.
DEFAULT_REVIEW_THRESHOLD = 0.7


def temperature_of(checkpoint: dict) -> float:
    """The calibration temperature T (probabilities = softmax(logits / T)); 1.0 when absent."""
    value = checkpoint.get("temperature")
    if value is None:
        return 1.0
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise CheckpointError(f"checkpoint temperature must be a positive number, not {value}")
    return value


def tta_of(checkpoint: dict) -> str:
    """The test-time augmentation inference applies ("none" or "hflip"; "none" when absent)."""
    value = checkpoint.get("test_time_augmentation") or "none"
    if value not in TTA_MODES:
        raise CheckpointError(f"checkpoint names unknown test-time augmentation {value!r}")
    return value


def review_threshold_of(checkpoint: dict, explicit: float | None = None) -> float:
    """needs_review threshold: an explicit value, else the checkpoint's, else 0.7."""
    if explicit is not None:
        return float(explicit)
    value = checkpoint.get("review_threshold")
    return DEFAULT_REVIEW_THRESHOLD if value is None else float(value)


def with_fields(checkpoint: dict, **fields) -> dict:
    """A copy with extra plain-value fields (temperature, review_threshold, ...), and the
    model_id they make: calibration is part of what a model outputs. A checkpoint from before
    weights_id existed gets one (its old model_id was the weights' hash)."""
    updated = {**checkpoint, **fields}
    updated.setdefault("weights_id", weights_id(updated["state_dict"]))
    return {**updated, "model_id": model_identity(updated)}


def locate_checkpoint(model_uri: str, options: StorageOptions) -> str:
    """A run directory means its best model; anything else is taken as the checkpoint file."""
    if storage.is_dir(model_uri, options):
        candidate = storage.join(model_uri, MODEL_FILE)
        if not storage.exists(candidate, options):
            raise FileNotFoundError(f"{storage.redact(model_uri)} has no {MODEL_FILE}; is it a "
                                    "finished brainray run directory?")
        return candidate
    return model_uri


def load_checkpoint(model_uri: str, options: StorageOptions) -> dict:
    """The checked checkpoint of a run directory or checkpoint file URI."""
    uri = locate_checkpoint(model_uri, options)
    return deserialize(storage.read_bytes(uri, options), source=storage.redact(uri))


def save_checkpoint(uri: str, checkpoint: dict, options: StorageOptions) -> None:
    storage.write_bytes(uri, serialize(checkpoint), options)


def write_train_checkpoint(directory: str, checkpoint: dict, train_state: dict) -> None:
    """A local directory for `ray.train.Checkpoint.from_directory`: the model and the state a
    resumed run needs (optimizer, schedule, loss scaler, loop state)."""
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(serialize(checkpoint))
    torch.save(train_state, os.path.join(directory, TRAIN_STATE_FILE))


def read_train_checkpoint(directory: str) -> tuple[dict, dict]:
    """(checkpoint, train state) of a directory written by `write_train_checkpoint`."""
    with open(os.path.join(directory, MODEL_FILE), "rb") as f:
        checkpoint = deserialize(f.read(), source=os.path.join(directory, MODEL_FILE))
    state = torch.load(os.path.join(directory, TRAIN_STATE_FILE), map_location="cpu",
                       weights_only=True)
    return checkpoint, state


def read_train_state(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
