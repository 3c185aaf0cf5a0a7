"""(4) `brainray score` end to end against the model's inference limit and a plain loop.

    python -m bench.scoring [--images 3000] [--model CHECKPOINT]

Three figures on the same files in one run: the model alone on pre-decoded tensors (the
inference limit), a plain PIL + torch loop over the files (what a user writes by hand), and
`brainray score` on a local Ray. brainray's steady rate is measured from two runs (a quarter of
the images, then all of them) so the job's fixed start-up is reported apart. All three use the
same model settings (channels-last, the allocator set up as brainray sets it up); `brainray
score` also computes and writes everything in the output schema (calibrated probabilities, OOD
guard, review flag) and commits exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import (
    DEFAULT_DATA,
    MemorySampler,
    mean_of_runs,
    rate_for,
    ratio,
    replicate,
    source_files,
    untrained_checkpoint,
)
from brainray.checkpoint import model_from_checkpoint
from brainray.config import ScoreConfig
from brainray.precision import autocast_for
from brainray.runtime_env import tune_this_process
from brainray.transforms import to_model_input


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(checkpoint: Path) -> torch.nn.Module:
    payload = torch.load(checkpoint, weights_only=True)
    return model_from_checkpoint(payload).to(_device(), memory_format=torch.channels_last)


def inference_limit(checkpoint: Path, batch: int, seconds: float) -> float:
    model, device = _model(checkpoint), _device()
    x = to_model_input(torch.randint(0, 256, (batch, 224, 224), dtype=torch.uint8,
                                     device=device))  # gray, as brainray carries images

    def step() -> int:
        with torch.inference_mode(), autocast_for(device):
            torch.softmax(model(x).float(), 1).cpu().numpy()
        return batch
    return rate_for(seconds, step)


def plain_loop(checkpoint: Path, files: list[Path], batch: int) -> float:
    """The loop a user writes by hand: PIL decode/convert to RGB (the paper's preprocessing)/
    resize, stack, forward."""
    model, device = _model(checkpoint), _device()
    start = time.perf_counter()
    with torch.inference_mode(), autocast_for(device):
        for i in range(0, len(files), batch):
            arrays = [np.asarray(Image.open(f).convert("RGB").resize((224, 224)))
                      for f in files[i:i + batch]]
            x = to_model_input(torch.from_numpy(np.stack(arrays)).to(device))
            torch.softmax(model(x).float(), 1).cpu().numpy()
    return len(files) / (time.perf_counter() - start)


def brainray_score(checkpoint: Path, folder: Path, output: Path, batch: int,
                   concurrency: int = 1) -> dict:
    import ray

    from brainray.cli import init_ray
    from brainray.score import run_scoring

    use_gpu = init_ray(None, use_gpu=None)  # GPUs when the machine has them
    try:
        with MemorySampler() as memory:
            start = time.perf_counter()
            summary = run_scoring(ScoreConfig(model=str(checkpoint), inputs=(str(folder),),
                                              output=str(output), batch_size=batch,
                                              concurrency=concurrency, use_gpu=use_gpu))
            total = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"images": summary["images"], "images_per_s": round(summary["images_per_s"], 1),
            "job_s_incl_listing_and_commit": round(total, 1),
            "job_images_per_s": round(summary["images"] / total, 1), **memory.report()}


def _steady(quarter: dict, full: dict) -> dict:
    """The job's fixed start-up (Ray Data, actor start and model load, listing, commit) is paid
    once per run; the steady rate is what the extra 3/4 of the images cost."""
    steady = (full["images"] - quarter["images"]) / (
        full["job_s_incl_listing_and_commit"] - quarter["job_s_incl_listing_and_commit"])
    return {**full, "steady_images_per_s": round(steady, 1),
            "fixed_startup_s": round(full["job_s_incl_listing_and_commit"]
                                     - full["images"] / steady, 1)}


def measure(data: str, images: int, model: str | None, batch: int, seconds: float,
            repeats: int = 2) -> dict:
    tune_this_process()
    torch.set_num_threads(os.cpu_count() or 1)
    plain_runs, ours_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = Path(model) if model else untrained_checkpoint("paper_cnn",
                                                                    workdir / "model.pt")
        folder = replicate(source_files(data), images, workdir / "inputs")
        files = sorted(folder.glob("*/*.jpg"))
        small = replicate(source_files(data), images // 4, workdir / "inputs_quarter")
        limit = inference_limit(checkpoint, batch, seconds)
        for i in range(repeats):  # alternately, so that drifts in the machine hit both alike
            plain_runs.append({"images_per_s": round(plain_loop(checkpoint, files, batch), 1)})
            quarter = brainray_score(checkpoint, small, workdir / f"out_quarter{i}", batch)
            ours_runs.append(_steady(quarter, brainray_score(checkpoint, folder,
                                                             workdir / f"out{i}", batch)))
    ours = mean_of_runs(ours_runs, "steady_images_per_s")
    plain_loop_runs = mean_of_runs(plain_runs, "images_per_s")
    steady, plain = ours["steady_images_per_s"], plain_loop_runs["images_per_s"]
    return {"images": images, "model": model or "paper_cnn (untrained)", "batch_size": batch,
            "repeats": repeats, "inference_limit_images_per_s": round(limit, 1),
            "plain_loop_images_per_s": plain,
            "plain_loop_images_per_s_runs": plain_loop_runs["images_per_s_runs"],
            "brainray": ours,
            "brainray_vs_inference_limit": ratio(steady, limit),
            "brainray_vs_plain_loop": ratio(steady, plain),
            "brainray_job_vs_plain_loop": ratio(ours["job_images_per_s"], plain)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--model", default=None, help="checkpoint (default: untrained paper_cnn)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each, alternately; figures are their means")
    args = parser.parse_args(argv)
    result = measure(args.data, args.images, args.model, args.batch_size, args.seconds,
                     args.repeats)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
