"""Batch inference: a callable class that loads a checkpoint once per actor, returns probabilities.

Used by evaluation and scoring through `Dataset.map_batches(Predictor, compute=ActorPoolStrategy)`.
"""

from __future__ import annotations

import numpy as np
import torch

from brainray import storage
from brainray.config import COL_IMAGE, StorageOptions
from brainray.model import deserialize, model_from_checkpoint, temperature_of, tta_of
from brainray.precision import autocast_for, prepare
from brainray.transforms import inference_views, to_model_input

COL_PROBS = "probs"


def resolve_checkpoint_uri(model_uri: str, options: StorageOptions) -> str:
    """A run directory means its best model; anything else is taken as the checkpoint file."""
    if storage.is_dir(model_uri, options):
        candidate = storage.join(model_uri, "model.pt")
        if not storage.exists(candidate, options):
            raise FileNotFoundError(f"{storage.redact(model_uri)} has no model.pt; is it a "
                                    "finished brainray run directory?")
        return candidate
    return model_uri


def load_checkpoint(model_uri: str, options: StorageOptions) -> dict:
    uri = resolve_checkpoint_uri(model_uri, options)
    return deserialize(storage.read_bytes(uri, options), source=storage.redact(uri))


class Predictor:
    """Holds one model per Ray actor; `__call__` maps a batch of uint8 images to probabilities."""

    def __init__(self, model_uri: str, options: StorageOptions, use_gpu: bool = False,
                 precision: str = "auto", tta: str | None = None):
        checkpoint = load_checkpoint(model_uri, options)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(checkpoint).to(self.device,
                                                         memory_format=torch.channels_last)
        self.precision = prepare(self.model, self.device, precision)
        self.model_id = checkpoint["model_id"]
        self.model_name = checkpoint["model_name"]
        self.classes = checkpoint["classes"]
        # Calibration and guards stored after training; absent in older checkpoints (T = 1).
        self.temperature = temperature_of(checkpoint)
        # The checkpoint's test-time augmentation unless the caller asks for another (the
        # training report also scores the test split without it, to show what it adds).
        self.tta = tta_of(checkpoint) if tta is None else tta
        self.review_threshold = checkpoint.get("review_threshold")
        self.ood_reference = checkpoint.get("ood_reference")

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        with torch.inference_mode(), autocast_for(self.device, self.precision):
            logits = torch.stack([self.model(view).float()
                                  for view in inference_views(x, self.tta)]).mean(0)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != COL_IMAGE}
        out[COL_PROBS] = self.predict(batch[COL_IMAGE])
        return out
