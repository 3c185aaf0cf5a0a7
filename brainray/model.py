"""The networks and their self-describing checkpoints.

A checkpoint is one dict of tensors and plain Python values (weights, class names,
preprocessing, config, metrics), so `torch.load(weights_only=True)` can read it and nothing
else is needed to score.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools

import torch
from torch import nn

from brainray.backbones import TorchvisionNet
from brainray.config import (
    ARCHITECTURE_KEYS,
    MODEL_NAMES,
    TORCHVISION_MODELS,
    TTA_MODES,
    PreprocessConfig,
)

CHECKPOINT_FORMAT = "brainray-checkpoint-v1"
_REQUIRED_FIELDS = ("model_name", "model_id", "classes", "preprocess", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not match what the caller expects."""


class GrayInputConv2d(nn.Conv2d):
    """A first convolution with RGB weights that also takes the gray image as one channel.

    The paper copies gray to three channels; convolving three equal channels with weights W is
    the same as convolving the one channel with W summed over its input channels, for outputs and
    for the gradients W receives (each input channel gets the same one). So the weights stay RGB,
    checkpoints keep their layout and RGB input still works, while the pipeline carries, augments
    and convolves a third of the data.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1 or self.in_channels == 1:
            return super().forward(x)
        if x.stride(1) != 1 and not self.weight.is_contiguous():
            # The model runs channels-last, but a one-channel tensor is channels-last and NCHW at
            # once, and convolution then falls back to its NCHW kernels for every layer after
            # (~30% slower on CPU). The stride of a size-1 dimension never addresses memory, so
            # setting it is a free view.
            x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
        return self._conv_forward(x, self.weight.sum(dim=1, keepdim=True), self.bias)


class _Network(nn.Module):
    """`features` then `classifier`; the first `stem_layers` modules of `features` are the first
    block, which runs under bf16 autocast when `bf16_stem` is set (`brainray.precision`)."""

    stem_layers = 0  # none: bf16-stem then runs fp32

    def __init__(self) -> None:
        super().__init__()
        self.bf16_stem = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16_stem:
            return self.classifier(self.features(x))
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            x = self.features[:self.stem_layers](x)
        return self.classifier(self.features[self.stem_layers:](x.float()))


class PaperCNN(_Network):
    """The paper's network: 3 x [conv3x3 + ReLU + maxpool 2x2], flatten, dense + ReLU, dropout."""

    stem_layers = 3  # conv1, pool1, ReLU1

    def __init__(self, num_classes: int, image_size: int = 224, hidden: int = 128,
                 dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 32, 64, 128]
        for c_in, c_out in itertools.pairwise(channels):
            conv = GrayInputConv2d if c_in == 3 else nn.Conv2d
            # max-pool then ReLU computes exactly ReLU then max-pool (both are monotone), but the
            # ReLU and its backward touch a 4x smaller tensor: about 20% faster training on CPU.
            # Neither layer has weights, so checkpoints load either way.
            layers += [conv(c_in, c_out, 3, padding=1), nn.MaxPool2d(2),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    conv = GrayInputConv2d if c_in == 3 else nn.Conv2d
    return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BNCNN(_Network):
    """A stronger from-scratch net: conv-BN-ReLU stages with global average pooling.

    Global pooling removes the paper's 12.8M-parameter dense layer, which is what lets this model
    generalise from a few thousand images; the stride-2 stem keeps compute near the paper CNN's.
    """

    # No bf16 first block: the stride-2 stem's output is already 4x smaller than paper_cnn's, and
    # bf16 measured no faster (README, Performance).
    stem_layers = 0

    def __init__(self, num_classes: int, image_size: int = 224, width: int = 32,
                 dropout: float = 0.3):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages: list[nn.Module] = [_conv_bn(3, widths[0], stride=2), _conv_bn(widths[0], widths[0]),
                                   nn.MaxPool2d(2)]
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            stages += [_conv_bn(c_in, c_out), _conv_bn(c_out, c_out)]
            if i < len(widths) - 2:
                stages.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(widths[-1], num_classes))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResCNN(_Network):
    """A small residual net for small data: a stride-2 conv-BN stem, four stages of `depth` basic
    blocks (widths w, 2w, 4w, 8w; each later stage halves the resolution), global average pooling.

    At depth 1 it has bn_cnn's convolutions plus shortcuts, with strided convolutions in place of
    max-pooling; ResNet-18's stages are this at width 64, depth 2, behind a 4x-downsampling stem.
    """

    stem_layers = 0

    def __init__(self, num_classes: int, image_size: int = 224, width: int = 32, depth: int = 1,
                 dropout: float = 0.2):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = [_conv_bn(3, width, stride=2)]
        c_in = width
        for stage, c_out in enumerate(widths):
            for block in range(depth):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage and not block else 1))
                c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(widths[-1], num_classes))


_MODELS = {"paper_cnn": PaperCNN, "bn_cnn": BNCNN, "res_cnn": ResCNN,
           **{name: functools.partial(TorchvisionNet, name) for name in TORCHVISION_MODELS}}
assert set(_MODELS) == set(MODEL_NAMES) == set(ARCHITECTURE_KEYS)


def check_architecture(name: str, architecture: dict | None) -> dict:
    """The architecture arguments `name` accepts, validated; a clear error for anything else."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_MODELS)}")
    architecture = {k: v for k, v in (architecture or {}).items() if v is not None}
    unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS[name]))
    if unknown:
        allowed = ", ".join(ARCHITECTURE_KEYS[name]) or "none"
        raise ValueError(f"model {name} does not take {', '.join(unknown)} (it takes: {allowed})")
    for key, value in architecture.items():
        if not (isinstance(value, int) and 1 <= value <= 1024):
            raise ValueError(f"{key} must be an integer in [1, 1024], not {value!r}")
    return architecture


def build_model(name: str, num_classes: int, image_size: int = 224,
                architecture: dict | None = None) -> nn.Module:
    architecture = check_architecture(name, architecture)
    return _MODELS[name](num_classes=num_classes, image_size=image_size, **architecture)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper, if any."""
    return model.module if hasattr(model, "module") else model


def weights_id(state_dict: dict[str, torch.Tensor]) -> str:
    """A stable short hash of the weights: identifies the exact model that produced a score."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def make_checkpoint(model: nn.Module, *, model_name: str, classes: list[str] | tuple[str, ...],
                    preprocess: PreprocessConfig, config: dict, metrics: dict,
                    epoch: int, architecture: dict | None = None, **fields) -> dict:
    """`fields`: further plain values (test_time_augmentation, initial_weights, ...)."""
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return {
        **fields,
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "architecture": check_architecture(model_name, architecture),
        "model_id": weights_id(state),
        "classes": list(classes),
        "preprocess": {"image_size": preprocess.image_size,
                       "max_image_pixels": preprocess.max_image_pixels},
        "config": config,
        "metrics": metrics,
        "epoch": epoch,
        "state_dict": state,
    }


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
    if checkpoint["model_name"] not in _MODELS:
        raise CheckpointError(f"{source} names unknown model {checkpoint['model_name']!r}")
    try:
        check_architecture(checkpoint["model_name"], checkpoint.get("architecture"))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    if expected_classes is not None and list(expected_classes) != checkpoint["classes"]:
        raise CheckpointError(f"{source} was trained on classes {checkpoint['classes']}, "
                              f"not {list(expected_classes)}")
    if weights_id(checkpoint["state_dict"]) != checkpoint["model_id"]:
        raise CheckpointError(f"{source}: weights do not match their recorded model_id")
    return checkpoint


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
    """A copy with extra plain-value fields (temperature, review_threshold, ...). The weights and
    so `model_id` are unchanged: calibration does not make a new model identity."""
    return {**checkpoint, **fields}
