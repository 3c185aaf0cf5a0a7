"""The two preprocessing presets, side by side (as torchvision's classification presets): every
job goes through one of them, so training and inference cannot drift apart.

Both start from the same base (`transforms.preprocess_image`: decode's output upright, any depth
to 8 bits, resize, gray uint8), which is also what the training job caches for all its splits.
They differ only in what follows:

* training scales each batch to [0, 1] on the device and augments it (seeded);
* inference measures the colour that the gray conversion drops (the OOD guard needs it) and
  scales each batch into the checkpoint's test-time views, whose logits are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from brainray import ood, transforms
from brainray.checkpoint import preprocess_config, tta_of
from brainray.config import AugmentConfig, PreprocessConfig


@dataclass(frozen=True)
class TrainPreset:
    preprocess: PreprocessConfig
    augment: AugmentConfig | None = None

    def image(self, image: Image.Image) -> np.ndarray:
        """A decoded image as the pipeline carries it: uint8 gray (size, size)."""
        return transforms.preprocess_image(image, self.preprocess)

    def batch(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 gray (N, H, W) on the device -> the augmented float batch the model trains on."""
        x = transforms.to_model_input(images)
        if self.augment is None:
            return x
        return transforms.augment_batch(x, self.augment, generator).contiguous(
            memory_format=torch.channels_last)


@dataclass(frozen=True)
class InferencePreset:
    preprocess: PreprocessConfig
    tta: str = "none"

    @classmethod
    def of(cls, checkpoint: dict, tta: str | None = None) -> InferencePreset:
        """The checkpoint's own preprocessing and test-time augmentation (or `tta`)."""
        return cls(preprocess_config(checkpoint), tta_of(checkpoint) if tta is None else tta)

    def image(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The model's gray input of a decoded image, and the colour fraction of the image it
        came from (brainray.ood): the pipeline carries gray, so colour is measured on the way."""
        resized = transforms.resize_image(image, self.preprocess)
        colour = (0.0 if resized.mode == "L"
                  else float(ood.colour_fractions(np.asarray(resized)[None])[0]))
        return transforms.gray_array(resized), colour

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 gray (N, H, W) on the device -> the float batches whose logits are averaged."""
        return transforms.inference_views(transforms.to_model_input(images), self.tta)
