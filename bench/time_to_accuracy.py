"""(6) Time to accuracy: wall time of `brainray train` to reach a test accuracy (the paper's
96.88% by default) on the leakage-free split of the shared training data.

    python -m bench.time_to_accuracy --run-dir runs/tta             # trains, then reports
    python -m bench.time_to_accuracy --run-dir runs/bn_light        # reports a finished run

Training runs brainray's default recipe (brainray.config.RECIPES["default"]); --epochs and
--seed override it. Test accuracy is measured once, on the best checkpoint, as `brainray train`
does; validation accuracy per epoch against elapsed training time shows when the plateau is reached.
This takes 20-40 minutes on 2 cores, so the suite runs it only with --time-to-accuracy.
"""

from __future__ import annotations

import argparse
import json
import os

from brainray import storage
from brainray.config import StorageOptions, TrainConfig

PAPER_ACCURACY = 0.9688
THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.95, PAPER_ACCURACY)


def report(metrics: dict, target: float) -> dict:
    history = metrics["history"]
    elapsed, curve = 0.0, []
    for epoch in history:
        elapsed += epoch["epoch_seconds"]
        curve.append({"epoch": epoch["epoch"], "elapsed_min": round(elapsed / 60, 1),
                      "val_accuracy": round(epoch["val_accuracy"], 4)})
    first_val = {f"{t:.4f}": next((p["elapsed_min"] for p in curve if p["val_accuracy"] >= t),
                                  None) for t in THRESHOLDS}
    return {
        "model": metrics["model_name"], "recipe": {k: metrics["config"][k] for k in (
            "model", "augment", "lr", "epochs", "patience", "batch_size_per_worker")},
        "target_test_accuracy": target,
        "test_accuracy": round(metrics["accuracy"], 4),
        "test_accuracy_ci95": [round(v, 4) for v in metrics["accuracy_ci95"]],
        "target_reached": metrics["accuracy"] >= target,
        "training_wall_min": round(metrics["training_wall_s"] / 60, 1),
        "best_epoch": metrics["best_epoch"],
        "baseline_1nn_test_accuracy": round(metrics["baseline_1nn"]["accuracy"], 4),
        "first_minute_validation_accuracy_reached": first_val,
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/brain-tumor-mri/Training")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--target", type=float, default=PAPER_ACCURACY)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    metrics_uri = storage.join(args.run_dir, "metrics.json")
    if not storage.exists(metrics_uri, StorageOptions()):
        import ray

        from brainray.cli import init_ray
        from brainray.train import run_training

        init_ray(None, use_gpu=False)
        try:
            run_training(TrainConfig(data=os.path.abspath(args.data), run_dir=args.run_dir,
                                     epochs=args.epochs, seed=args.seed))
        finally:
            ray.shutdown()
    result = report(storage.read_json(metrics_uri, StorageOptions()), args.target)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
