"""(5) Scaling with data size: training-epoch and scoring time per image, and peak memory, at
1x, 4x and 16x a base number of images.

    python -m bench.scaling [--train-base 250] [--score-base 500] [--factors 1 4 16]

Training: seconds per training image over the epochs after the first (the first decodes and
caches), and the whole job's. Small sizes train more epochs, so that the steady figure always
covers at least MIN_STEADY_IMAGES images: a 200-image epoch lasts 4 s, and one hiccup of the
machine would otherwise move it by 10%. Every epoch still pays its own fixed costs. Scoring:
the job's seconds per image, which carries a fixed start-up (actor start, model load, listing,
commit) that larger runs amortise, and the marginal seconds per image between consecutive sizes,
which is what must stay flat. Memory: peak private memory of every process of the local Ray
cluster, and peak object-store use. Training caches decoded images in the object store on
purpose (150 KB each at 224 px), so that figure grows with the data until the store is full and
Ray spills to disk; everything else must stay flat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from bench.common import DEFAULT_DATA, replicate, source_files, untrained_checkpoint
from bench.scoring import brainray_score
from bench.training import run_brainray
from brainray.runtime_env import tune_this_process

MIN_STEADY_IMAGES = 1600
TRAIN_SHARE = 0.8  # of the images, after the default validation and test splits


def epochs_for(images: int, minimum: int) -> int:
    """One first epoch, then enough for MIN_STEADY_IMAGES training images (at least `minimum`
    epochs in all)."""
    steady = math.ceil(MIN_STEADY_IMAGES / max(1, round(images * TRAIN_SHARE)))
    return max(minimum, 1 + steady)


def steady_ms_per_image(epoch_seconds: list[float], images_per_epoch: int) -> float:
    """Milliseconds per training image over every epoch after the first."""
    steady = epoch_seconds[1:] or epoch_seconds
    return round(sum(steady) / (len(steady) * images_per_epoch) * 1000, 2)


def _marginal(points: list[dict], seconds_key: str) -> list[float | None]:
    out: list[float | None] = [None]
    for before, after in zip(points, points[1:], strict=False):
        extra = after["images"] - before["images"]
        out.append(round((after[seconds_key] - before[seconds_key]) / extra * 1000, 2))
    return out


def measure(data: str, train_base: int, score_base: int, factors: list[int], model: str,
            epochs: int) -> dict:
    tune_this_process()
    torch.set_num_threads(os.cpu_count() or 1)
    files = source_files(data)
    training, scoring = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = untrained_checkpoint(model, workdir / "model.pt")
        for factor in factors:
            n = train_base * factor
            folder = replicate(files, n, workdir / f"train{n}")
            run = run_brainray(folder, workdir / f"run{n}", model, epochs_for(n, epochs), 32)
            training.append({
                "factor": factor, "images": n, "train_images_per_epoch":
                    run["train_images_per_epoch"],
                "epoch_train_seconds": run["epoch_train_seconds"],
                "steady_epoch_ms_per_image": steady_ms_per_image(
                    run["epoch_train_seconds"], run["train_images_per_epoch"]),
                "job_wall_s": run["job_wall_s"],
                **{k: v for k, v in run.items() if k.startswith("peak_")}})
        for factor in factors:
            n = score_base * factor
            folder = replicate(files, n, workdir / f"score{n}")
            result = brainray_score(checkpoint, folder, workdir / f"out{n}", 64)
            scoring.append({"factor": factor, "images": n,
                            "job_s": result["job_s_incl_listing_and_commit"],
                            "job_ms_per_image": round(
                                result["job_s_incl_listing_and_commit"] / n * 1000, 2),
                            **{k: v for k, v in result.items() if k.startswith("peak_")}})
    for point, marginal in zip(scoring, _marginal(scoring, "job_s"), strict=True):
        point["marginal_ms_per_image"] = marginal
    steady = [p["steady_epoch_ms_per_image"] for p in training]
    marginal = [p["marginal_ms_per_image"] for p in scoring if p["marginal_ms_per_image"]]
    return {"model": model, "training": training, "scoring": scoring,
            "training_time_per_image_spread": round(max(steady) / min(steady) - 1, 3),
            "scoring_marginal_time_per_image_spread": (
                round(max(marginal) / min(marginal) - 1, 3) if marginal else None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--train-base", type=int, default=250)
    parser.add_argument("--score-base", type=int, default=1000)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--model", default="paper_cnn", choices=["paper_cnn", "bn_cnn"])
    parser.add_argument("--epochs", type=int, default=2,
                        help="at least this many epochs per size (small sizes train more)")
    args = parser.parse_args(argv)
    result = measure(args.data, args.train_base, args.score_base, args.factors, args.model,
                     args.epochs)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
