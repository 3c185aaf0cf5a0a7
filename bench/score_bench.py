"""Scoring throughput: `brainray score` end to end vs the model alone vs a hand-written loop.

    python -m bench.score_bench --data ../shared/data/brain-tumor-mri/Training --images 3000

Prints images/s for (1) the model alone on pre-decoded tensors (the compute limit), (2) a plain
PIL + torch loop over the files (what a user would write by hand), (3) `brainray score` on a local
Ray, and the ratios of (3) to (1) and (2). All three run in this process, on the same files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brainray.config import DEFAULT_CLASSES, PreprocessConfig, ScoreConfig
from brainray.model import build_model, make_checkpoint, model_from_checkpoint, serialize
from brainray.transforms import to_model_input


def _files(data: str, n: int) -> list[str]:
    files = sorted(glob.glob(os.path.join(data, "*", "*.jpg")))
    if not files:
        raise SystemExit(f"no JPEGs under {data}/<class>/")
    return (files * (n // len(files) + 1))[:n]


def _checkpoint(path: str | None, workdir: Path) -> Path:
    if path:
        return Path(path)
    torch.manual_seed(0)  # throughput does not depend on the weights
    model = build_model("paper_cnn", len(DEFAULT_CLASSES))
    target = workdir / "model.pt"
    target.write_bytes(serialize(make_checkpoint(
        model, model_name="paper_cnn", classes=DEFAULT_CLASSES, preprocess=PreprocessConfig(),
        config={}, metrics={}, epoch=0)))
    return target


def _model(checkpoint: Path) -> torch.nn.Module:
    payload = torch.load(checkpoint, weights_only=True)
    return model_from_checkpoint(payload).to(memory_format=torch.channels_last)


def bench_model_alone(checkpoint: Path, batch: int, seconds: float = 20.0) -> float:
    model = _model(checkpoint)
    x = to_model_input(torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8))
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN picks its kernels on the first call
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
    return done / (time.perf_counter() - start)


def bench_plain_loop(checkpoint: Path, files: list[str], batch: int) -> float:
    """The loop a user writes by hand: PIL decode/convert/resize, stack, forward."""
    model = _model(checkpoint)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            arrays = [np.asarray(Image.open(f).convert("RGB").resize((224, 224)))
                      for f in files[i:i + batch]]
            probs = torch.softmax(model(to_model_input(torch.from_numpy(np.stack(arrays)))), 1)
            probs.numpy()
    return len(files) / (time.perf_counter() - start)


def bench_brainray(checkpoint: Path, files: list[str], workdir: Path, batch: int,
                   concurrency: int) -> dict:
    import ray

    from brainray.score import run_scoring

    inputs = workdir / "inputs"
    for i, source in enumerate(files):  # replicas need distinct names to be distinct inputs
        target = inputs / Path(source).parent.name / f"{i:06d}_{Path(source).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(source, target)
    ray.init(configure_logging=False)
    try:
        start = time.perf_counter()
        summary = run_scoring(ScoreConfig(model=str(checkpoint), inputs=(str(inputs),),
                                          output=str(workdir / "out"), batch_size=batch,
                                          concurrency=concurrency))
        summary["total_s"] = time.perf_counter() - start
    finally:
        ray.shutdown()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training",
                        help="folder with one sub-folder of JPEGs per class")
    parser.add_argument("--images", type=int, default=3000, help="images to score")
    parser.add_argument("--model", default=None, help="checkpoint (default: untrained paper_cnn)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=1, help="brainray inference actors")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    files = _files(args.data, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = _checkpoint(args.model, workdir)
        limit = bench_model_alone(checkpoint, args.batch_size)
        plain = bench_plain_loop(checkpoint, files, args.batch_size)
        summary = bench_brainray(checkpoint, files, workdir, args.batch_size, args.concurrency)
    ours = summary["images_per_s"]
    result = {
        "images": len(files), "cpu_count": os.cpu_count(),
        "model_alone_images_per_s": round(limit, 1),
        "plain_pil_torch_loop_images_per_s": round(plain, 1),
        "brainray_score_images_per_s": round(ours, 1),
        "brainray_score_total_s_incl_listing_and_commit": round(summary["total_s"], 1),
        "brainray_vs_model_alone": round(ours / limit, 3),
        "brainray_vs_plain_loop": round(ours / plain, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
