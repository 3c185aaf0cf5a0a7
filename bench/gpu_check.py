"""The GPU paths, end to end, on a CUDA machine: one command, one JSON of figures and failures.

    python -m bench.gpu_check --out gpu-check.json

It runs, on the embedded sample (each step isolated: a failure is recorded and the next step
still runs):
1. a 1-epoch training run with AMP (fp16) on 1 GPU;
2. the same with 2 DDP workers (sharing the GPU when there is only one: 0.5 GPU each);
3. a resume: the first run relaunched for a second epoch;
4. a scoring run with GPU actors (one per GPU, or two sharing one);
5. the compute limit and scoring benchmarks (bench.compute, bench.scoring) on CUDA.
Without CUDA it writes {"cuda": false, ...} and exits 1 (`--allow-cpu` runs the same steps on
the CPU: a check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import compute, scoring
from brainray import storage
from brainray.cli import run
from brainray.data import sample_data_dir

SAMPLE_FLAGS = ["--image-size", "128", "--batch-size", "16", "--warmup-epochs", "0"]


def _step(results: dict, name: str, function) -> None:
    """Run one step; its figures, or its failure (one line and the traceback's tail)."""
    started = time.perf_counter()
    try:
        results[name] = {"ok": True, **(function() or {})}
    except Exception as exc:  # every step is reported, whatever fails
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)


def _train(run_dir: Path, workers: int, gpu: bool, epochs: int = 1) -> dict:
    gpus = torch.cuda.device_count()
    share = ["--gpus-per-worker", "0.5"] if gpu and workers > gpus else []
    code = run(["train", "--data", sample_data_dir(), "--run-dir", str(run_dir), "--epochs",
                str(epochs), "--num-workers", str(workers), *SAMPLE_FLAGS, *share,
                "--use-gpu" if gpu else "--no-gpu", "--cpus-per-worker", "1"])
    if code != 0:
        raise RuntimeError(f"brainray train exited {code}")
    metrics = storage.read_json(str(run_dir / "metrics.json"))
    last = metrics["history"][-1]
    return {"precision": last["precision"], "train_images_per_s": last["images_per_s"],
            "epochs": [h["epoch"] for h in metrics["history"]],
            "resumed_at_epochs": metrics["resumed_at_epochs"],
            "test_accuracy": metrics["accuracy"]}


def _score(model: Path, output: Path, gpu: bool) -> dict:
    per_actor = "1" if torch.cuda.device_count() >= 2 else "0.5"
    code = run(["score", "--model", str(model), "--input", sample_data_dir(), "--output",
                str(output), "--concurrency", "2", "--num-gpus-per-actor", per_actor,
                "--use-gpu" if gpu else "--no-gpu"])
    if code != 0:
        raise RuntimeError(f"brainray score exited {code}")
    (run_summary,) = storage.read_json(str(output / "_manifest.json"))["runs"]
    return {"images": run_summary["images"], "images_per_s": run_summary["images_per_s"]}


def _benchmarks() -> dict:
    return {"compute": compute.main(["--seconds", "10"]), "scoring": scoring.main([])}


def check(work: Path, gpu: bool) -> dict:
    results: dict = {"cuda": torch.cuda.is_available(),
                     "devices": [torch.cuda.get_device_name(i)
                                 for i in range(torch.cuda.device_count())]}
    steps = results.setdefault("steps", {})
    _step(steps, "train_1_worker_amp", lambda: _train(work / "one", 1, gpu))
    _step(steps, "train_2_workers", lambda: _train(work / "two", 2, gpu))
    _step(steps, "resume", lambda: _train(work / "one", 1, gpu, epochs=2))
    _step(steps, "score_gpu_actors", lambda: _score(work / "one", work / "scores", gpu))
    if gpu:
        _step(steps, "benchmarks", _benchmarks)
    results["failed"] = sorted(name for name, step in steps.items() if not step["ok"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check.json", help="where the JSON goes")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run the steps on the CPU (checks the script)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.allow_cpu:
        results = {"cuda": False, "error": "no CUDA device: nothing to check here"}
    else:
        with tempfile.TemporaryDirectory() as work:
            results = check(Path(work), gpu)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}, indent=2))
    return 0 if gpu and not results.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
