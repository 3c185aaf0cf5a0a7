"""(2) `brainray train` end to end against the compute limit, and (3) against a hand-written
torchvision `ImageFolder` + `DataLoader(num_workers=2)` loop on the same files.

    python -m bench.training [--images 2000] [--epochs 2] [--model paper_cnn]

Both train the same model with the same settings (channels-last, fused Adam, the allocator set up
as brainray sets it up, the paper's augmentation, batch 32), so the comparison isolates the
input pipeline: decode, resize, augment, batch, hand over. Steady-state figures are the last
epoch's; brainray's whole-job figure also pays for the one-off decode, the split, validation,
calibration and the report.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import (
    DEFAULT_DATA,
    MemorySampler,
    mean_of_runs,
    ratio,
    replicate,
    source_files,
)
from brainray.config import TrainConfig
from brainray.model import build_model
from brainray.precision import autocast_for, prepare
from brainray.runtime_env import tune_this_process
from brainray.train_loop import make_optimizer


def run_brainray(data: Path, run_dir: Path, model: str, epochs: int, batch_size: int) -> dict:
    import ray

    from brainray.cli import init_ray
    from brainray.train import run_training

    config = TrainConfig(data=str(data), run_dir=str(run_dir), model=model, epochs=epochs,
                         batch_size_per_worker=batch_size, augment="paper", patience=epochs + 1,
                         use_gpu=torch.cuda.is_available())
    init_ray(None, use_gpu=config.use_gpu)
    try:
        with MemorySampler() as memory:
            started = time.perf_counter()
            report = run_training(config)
            job_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    history = report["history"]
    last = history[-1]
    return {
        "steady_train_images_per_s": round(last["images_per_s"], 1),
        "steady_input_wait_fraction": round(last["input_wait_fraction"], 3),
        "epoch_train_seconds": [round(h["train_seconds"], 1) for h in history],
        "train_images_per_epoch": last["train_images"],
        "job_wall_s": round(job_s, 1),
        "job_images_per_s": round(sum(h["train_images"] for h in history) / job_s, 1),
        **memory.report(),
    }


def torchvision_transform():
    """The paper's preprocessing and augmentation as users write it with torchvision."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.PILToTensor(),
        v2.RGB(),
        v2.Resize((224, 224), antialias=True),
        v2.RandomAffine(degrees=30, translate=(0.05, 0.05), scale=(0.85, 1.15)),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
        v2.ToDtype(torch.float32, scale=True),
    ])


def run_torchvision(data: Path, model_name: str, epochs: int, batch_size: int,
                    num_workers: int = 2) -> dict:
    """The hand-written baseline: ImageFolder, DataLoader(num_workers=2, shuffle=True)."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_name, 4).to(device, memory_format=torch.channels_last)
    precision = prepare(model, device, "auto")  # what `brainray train` uses
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    optimizer = make_optimizer(model, 5e-4, 0.0, device)
    loader = DataLoader(ImageFolder(str(data), transform=torchvision_transform()),
                        batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        persistent_workers=True, drop_last=False)
    epoch_rates, epoch_waits = [], []
    started = time.perf_counter()
    with MemorySampler() as memory:
        for _ in range(epochs):
            model.train()
            seen, wait, epoch_start = 0, 0.0, time.perf_counter()
            batches = iter(loader)
            while True:
                waited_from = time.perf_counter()
                batch = next(batches, None)
                wait += time.perf_counter() - waited_from
                if batch is None:
                    break
                x, y = batch
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                y = y.to(device)
                with autocast_for(device, precision):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += len(y)
            elapsed = time.perf_counter() - epoch_start
            epoch_rates.append(seen / elapsed)
            epoch_waits.append(wait / elapsed)
    wall = time.perf_counter() - started
    return {"steady_train_images_per_s": round(epoch_rates[-1], 1),
            "steady_input_wait_fraction": round(epoch_waits[-1], 3),
            "epoch_images_per_s": [round(r, 1) for r in epoch_rates],
            "wall_s": round(wall, 1), "num_workers": num_workers, **memory.report()}


def measure(data: str, images: int, model: str, epochs: int, batch_size: int,
            compute_limit: float | None, repeats: int = 2) -> dict:
    tune_this_process()
    torch.set_num_threads(os.cpu_count() or 1)
    ours_runs, baseline_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = replicate(source_files(data), images, Path(tmp) / "data")
        for i in range(repeats):  # alternately, so that drifts in the machine hit both alike
            ours_runs.append(run_brainray(folder, Path(tmp) / f"run{i}", model, epochs,
                                          batch_size))
            baseline_runs.append(run_torchvision(folder, model, epochs, batch_size))
    ours = mean_of_runs(ours_runs, "steady_train_images_per_s")
    baseline = mean_of_runs(baseline_runs, "steady_train_images_per_s")
    result = {"images": images, "model": model, "epochs": epochs, "batch_size": batch_size,
              "repeats": repeats,
              "brainray": ours, "torchvision_dataloader": baseline,
              "brainray_vs_torchvision": ratio(ours["steady_train_images_per_s"],
                                               baseline["steady_train_images_per_s"])}
    if compute_limit:
        result["compute_limit_train_images_per_s"] = compute_limit
        result["brainray_vs_compute_limit"] = ratio(ours["steady_train_images_per_s"],
                                                    compute_limit)
    return result


def main(argv: list[str] | None = None, compute_limit: float | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="paper_cnn", choices=["paper_cnn", "bn_cnn"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each, alternately; figures are their means")
    args = parser.parse_args(argv)
    result = measure(args.data, args.images, args.model, args.epochs, args.batch_size,
                     compute_limit, args.repeats)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
