"""torchvision's ImageNet architectures as brainray models, and their initial (pretrained) weights.

The models take the pipeline's gray [0, 1] images: the one channel is repeated to three and
normalised with ImageNet's mean and std, which is what the pretrained weights expect. Initial
weights come from torchvision's weight enums (downloaded into $TORCH_HOME, or read from its
cache offline) or from a state-dict file; either way they are loaded with weights_only=True and
checked key by key and shape by shape before any training starts.
"""

from __future__ import annotations

import hashlib
import io
import os

import torch
from torch import nn

from brainray.config import TORCHVISION_MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = "imagenet"

# The classification layer torchvision's builders create for num_classes; it is replaced, so a
# 1000-class ImageNet head in a weights file is skipped, never loaded.
_HEAD_PREFIX = {"resnet18": "fc.", "resnet50": "fc.", "efficientnet_b0": "classifier.1.",
                "convnext_tiny": "classifier.2."}
# The last feature map, for Grad-CAM: the output of the final stage, before pooling.
_CAM_LAYER = {"resnet18": "layer4", "resnet50": "layer4", "efficientnet_b0": "features",
              "convnext_tiny": "features"}


def _torchvision_models():
    # Imported on first use: torchvision pulls in torch._dynamo (~4 s of CPU), which every
    # training worker and scoring actor would pay at start-up for a brainray CNN that needs none.
    import torchvision.models

    return torchvision.models


class WeightsError(ValueError):
    """Initial weights that cannot be found, loaded safely, or do not fit the architecture."""


class TorchvisionNet(nn.Module):
    """A torchvision classifier with a `num_classes` head behind a gray-to-ImageNet input step."""

    stem_layers = 0  # no bf16 first block (brainray.precision)

    def __init__(self, name: str, num_classes: int, image_size: int = 224):
        super().__init__()
        self.name = name
        self.bf16_stem = False
        self.net = _torchvision_models().get_model(name, weights=None, num_classes=num_classes)
        # Not persistent: constants of the input step, so state dicts hold only torchvision's keys
        # (under "net.") and a plain torchvision file maps onto them one to one.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)

    @property
    def cam_layer(self) -> nn.Module:
        return self.net.get_submodule(_CAM_LAYER[self.name])

    def head_parameter_names(self) -> set[str]:
        """Names (as in `named_parameters`) of the new classification layer."""
        prefix = "net." + _HEAD_PREFIX[self.name]
        return {name for name, _ in self.named_parameters() if name.startswith(prefix)}


def check_fits(model: TorchvisionNet, state_dict: dict, source: str) -> dict[str, torch.Tensor]:
    """The backbone part of a torchvision state dict, refused unless every backbone key is there
    with the model's shape and nothing else is (the classification head is skipped)."""
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise WeightsError(f"{source} is not a state dict (a mapping of names to tensors)")
    head = _HEAD_PREFIX[model.name]
    wanted = {k: v for k, v in model.net.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    missing = sorted(set(wanted) - set(given))
    unexpected = sorted(set(given) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(given) if wanted[k].shape != given[k].shape)
    problems = [f"{label} {len(keys)} (e.g. {keys[0]})"
                for label, keys in (("missing keys:", missing), ("unexpected keys:", unexpected),
                                    ("shape mismatches:", wrong)) if keys]
    if wrong:
        key = wrong[0]
        problems[-1] += f": {tuple(given[key].shape)} vs {tuple(wanted[key].shape)}"
    if problems:
        raise WeightsError(f"{source} does not fit {model.name}: " + "; ".join(problems))
    return given


def load_backbone(model: TorchvisionNet, state_dict: dict, source: str = "weights") -> None:
    """Copy checked pretrained weights into `model`; its new head keeps its initialisation."""
    model.net.load_state_dict(check_fits(model, state_dict, source), strict=False)


def _read_weights_file(data: bytes, source: str) -> dict:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled code, RuntimeError for garbage, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{source} cannot be loaded safely (weights_only=True): {reason}"
                           ) from exc


def _imagenet_file(name: str) -> tuple[bytes, str]:
    """The bytes of torchvision's default ImageNet weights for `name`, from its cache in
    $TORCH_HOME (downloaded there first where the node has internet)."""
    weights = _torchvision_models().get_model_weights(name).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached):
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
        except Exception as exc:
            raise WeightsError(
                f"ImageNet weights for {name} are not in {os.path.dirname(cached)} and could not "
                f"be downloaded from {weights.url} ({type(exc).__name__}: {exc}); pre-stage the "
                "file there (or set TORCH_HOME), or pass --weights PATH") from exc
    with open(cached, "rb") as f:
        return f.read(), f"torchvision {weights} ({weights.url})"


def initial_weights(spec: str, model_name: str, read_bytes) -> tuple[dict, dict]:
    """(state dict, provenance) for `--weights imagenet` or `--weights URI`, checked against the
    architecture. `read_bytes(uri)` reads a file from wherever it lives (brainray.storage)."""
    if model_name not in TORCHVISION_MODELS:
        raise WeightsError(f"--weights needs a torchvision model ({', '.join(TORCHVISION_MODELS)})"
                           f", not {model_name}")
    if spec == IMAGENET:
        data, source = _imagenet_file(model_name)
    else:
        data, source = read_bytes(spec), spec
    state_dict = _read_weights_file(data, source)
    check_fits(TorchvisionNet(model_name, num_classes=2), state_dict, source)
    provenance = {"source": source, "sha256": hashlib.sha256(data).hexdigest()}
    return state_dict, provenance
