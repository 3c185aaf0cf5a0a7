"""The networks: the paper's CNN, brainray's BN and residual CNNs, torchvision's (backbones.py).

Every model takes the pipeline's gray (N, 1, H, W) images in [0, 1] (RGB works too) and returns
logits; `build_model` makes one from its name and size arguments, which is also how a checkpoint
(brainray.checkpoint) rebuilds the network it holds.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from brainray.backbones import TorchvisionNet
from brainray.config import ARCHITECTURE_KEYS, MODEL_NAMES, TORCHVISION_MODELS


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
