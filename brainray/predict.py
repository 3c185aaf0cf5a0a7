"""Batch inference: a callable class that loads a checkpoint once per actor and returns
probabilities, and the labeled predictions that training and evaluation report on.

Used by evaluation and scoring through `Dataset.map_batches(Predictor, compute=ActorPoolStrategy)`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
import torch

from brainray.checkpoint import load_checkpoint, model_from_checkpoint, temperature_of
from brainray.config import COL_IMAGE, COL_LABEL, COL_PATH, COL_PROBS, StorageOptions
from brainray.data import select_rows
from brainray.precision import autocast_for, prepare
from brainray.presets import InferencePreset


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
        self.preset = InferencePreset.of(checkpoint, tta)
        self.review_threshold = checkpoint.get("review_threshold")
        self.ood_reference = checkpoint.get("ood_reference")

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with torch.inference_mode(), autocast_for(self.device, self.precision):
            logits = torch.stack([self.model(view).float()
                                  for view in self.preset.views(x)]).mean(0)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != COL_IMAGE}
        out[COL_PROBS] = self.predict(batch[COL_IMAGE])
        return out


_PART = "__part"  # which of predict_splits' datasets a row came from (the same file may be in two)


def _tag(batch: pa.Table, *, part: str) -> pa.Table:
    return batch.append_column(_PART, pa.array([part] * batch.num_rows, pa.string()))


def _rows(dataset: ray.data.Dataset, paths) -> ray.data.Dataset:
    """`paths=None`: every row of `dataset`, which must hold just path, image and label (a split
    from `materialize_splits`): filtering it again would copy every image once more."""
    if paths is None:
        return dataset
    return select_rows(dataset, paths, columns=(COL_PATH, COL_IMAGE, COL_LABEL))


def predict_splits(parts: dict[str, tuple[ray.data.Dataset, object]], model_uri: str,
                   options: StorageOptions, batch_size: int = 64, num_actors: int = 1,
                   use_gpu: bool = False, tta: str | None = None) -> dict[str, pd.DataFrame]:
    """`predict_labeled` of several (dataset, paths) parts in one Ray Data pass, by part name.

    One pass starts one actor pool and loads the model once: a training run's validation and
    test predictions each cost that start-up (~8 s on 2 cores) when run one after the other.
    """
    tagged = len(parts) > 1  # a single part has nothing to tell apart: no tagging pass
    if tagged:
        rows = ray.data.Dataset.union(*(
            _rows(dataset, paths).map_batches(_tag, fn_kwargs={"part": name},
                                              batch_format="pyarrow", zero_copy_batch=True)
            for name, (dataset, paths) in parts.items()))
    else:
        rows = _rows(*next(iter(parts.values())))
    predicted = rows.map_batches(
        Predictor, batch_size=batch_size,
        fn_constructor_kwargs={"model_uri": model_uri, "options": options, "use_gpu": use_gpu,
                               "tta": tta},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=1 if use_gpu else 0)
    columns = [COL_PATH, COL_LABEL, COL_PROBS] + ([_PART] if tagged else [])
    frame = predicted.select_columns(columns).to_pandas().sort_values(COL_PATH, kind="stable")
    if not tagged:
        return {next(iter(parts)): frame.reset_index(drop=True)}
    return {name: frame[frame[_PART] == name].drop(columns=_PART).reset_index(drop=True)
            for name in parts}


def predict_labeled(dataset: ray.data.Dataset, paths, model_uri: str, options: StorageOptions,
                    batch_size: int = 64, num_actors: int = 1,
                    use_gpu: bool = False, tta: str | None = None) -> pd.DataFrame:
    """Per-image path, true label and class probabilities (small: the images stay in Ray).

    `tta` overrides the checkpoint's test-time augmentation ("none" or "hflip"). `paths`
    selects rows of `dataset`; None takes them all (see `_rows`).
    """
    return predict_splits({"rows": (dataset, paths)}, model_uri, options, batch_size,
                          num_actors, use_gpu, tta)["rows"]
