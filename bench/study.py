"""The recipe study: `brainray train` runs on the shared data's leakage-free split, one per row,
and the table of what each run measured (README, Results).

    python -m bench.study --list                          # the rows and their flags
    python -m bench.study --run default_s0 default_s1    # train those rows (skips finished ones)
    python -m bench.study --table                         # the Markdown table of finished rows

Each row is `brainray train --data <shared Training> --run-dir <root>/<row> <flags>`, run as a
subprocess, so it measures exactly what a user runs; the whole wall time (decode, train,
calibrate, report) is recorded beside the run as study.json. Rows are run one at a time: two
trainings on 2 cores would slow each other, and the wall times would mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import DEFAULT_DATA

DEFAULT_ROOT = "runs/study"
# Flags every tricks row shares: EMA of the weights, label smoothing, flip TTA.
TRICKS = ("--ema-decay", "0.998", "--label-smoothing", "0.1", "--tta", "hflip")


def _bn(size: int = 128, epochs: int = 45, *extra: str, model: str = "bn_cnn",
        lr: str = "2e-3", augment: str = "light") -> tuple[str, ...]:
    """A study row's flags: the model at a size, cosine schedule without early stopping."""
    return ("--model", model, "--image-size", str(size), "--augment", augment, "--lr", lr,
            "--epochs", str(epochs), "--patience", str(epochs), *extra)


# name -> flags after `brainray train --data ... --run-dir ...`. Rows that decide the default
# come in seed pairs (_s0, _s1); --seed also changes the split, whose 1-NN baseline is reported.
ROWS: dict[str, tuple[str, ...]] = {
    "default": (),  # `brainray train` with no flags: the default recipe
    "bn128_e30": ("--model", "bn_cnn", "--image-size", "128", "--augment", "light", "--lr",
                  "2e-3", "--epochs", "30", "--patience", "10"),
    "bn128_e45": _bn(),
    "bn128_e45_tricks": _bn(128, 45, *TRICKS),
    "bn128_e45_ema": _bn(128, 45, "--ema-decay", "0.998"),
    "bn128_e45_medium": _bn(128, 45, augment="medium"),
    "bn128_e45_strict099": _bn(128, 45, "--dedup-min-similarity", "0.99"),
    "bn128_e45_onecycle": _bn(128, 45, "--lr-schedule", "onecycle", lr="3e-3"),
    "bn128_e45_adamw": _bn(128, 45, "--optimizer", "adamw", "--weight-decay", "0.05"),
    "bn128w48_e40": _bn(128, 40, "--width", "48"),
    "bn160_e40": _bn(160, 40),
    "res128_e45": _bn(128, 45, model="res_cnn"),
    "res128_e45_tricks": _bn(128, 45, *TRICKS, model="res_cnn"),
    "bn160_e40_tricks": _bn(160, 40, *TRICKS),
    "bn128w48_e40_tricks": _bn(128, 40, "--width", "48", *TRICKS),
    "bn128_e45_tricks_medium": _bn(128, 45, *TRICKS, augment="medium"),
    "resnet18_128_e30": _bn(128, 30, model="resnet18", lr="1e-3"),
    "resnet18_128_e30_tricks": _bn(128, 30, *TRICKS, model="resnet18", lr="1e-3"),
    "paper": ("--recipe", "paper"),
    # DDP: the same 10-epoch recipe on 1 worker and on 2 (each with one of the two cores)
    "ddp1_e10": _bn(128, 10),
    "ddp2_e10": _bn(128, 10, "--num-workers", "2", "--cpus-per-worker", "0.5",
                    "--batch-size", "16"),
}


def _run_dir(root: str, name: str) -> str:
    return os.path.join(root, name)


def run_row(name: str, root: str, data: str, seed: int | None = None) -> dict:
    """Train one row (unless its metrics.json exists) and return its study record."""
    run_dir = _run_dir(root, name)
    record_path = os.path.join(run_dir, "study.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    base, _, seed_suffix = name.rpartition("_s")
    flags = ROWS[base] if seed_suffix.isdigit() and base in ROWS else ROWS[name]
    if seed_suffix.isdigit() and base in ROWS:
        seed = int(seed_suffix)
    command = ["brainray", "train", "--data", os.path.abspath(data), "--run-dir", run_dir,
               *flags, *(("--seed", str(seed)) if seed is not None else ())]
    os.makedirs(run_dir, exist_ok=True)
    started = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "ab") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    record = {"name": name, "command": " ".join(command), "returncode": code,
              "wall_s": time.perf_counter() - started}
    if code == 0:
        with open(record_path, "w") as f:
            json.dump(record, f, indent=2)
    return record


def record_finished(name: str, root: str) -> dict:
    """study.json for a row trained outside `run_row` (by hand, or by a queue that was
    stopped): the wall time from the run's first file (config.json) to its last
    (MODEL_CARD.md), which misses only Ray's start-up."""
    run_dir = _run_dir(root, name)
    started = os.path.getmtime(os.path.join(run_dir, "config.json"))
    ended = os.path.getmtime(os.path.join(run_dir, "MODEL_CARD.md"))
    record = {"name": name, "command": "(see config.json)", "returncode": 0,
              "wall_s": ended - started, "wall_from": "file times"}
    with open(os.path.join(run_dir, "study.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def _recall(metrics: dict, name: str) -> float:
    return metrics["per_class"][name]["recall"]


def table_row(name: str, metrics: dict, record: dict) -> str:
    """One Markdown row: accuracy (CI), macro-F1, meningioma recall, the split's 1-NN baseline
    and the margin over it, accuracy without TTA, near-duplicates left, best epoch, whole wall
    time and training img/s."""
    low, high = metrics["accuracy_ci95"]
    nn = metrics["baseline_1nn"]["accuracy"]
    plain = metrics.get("without_tta")
    similar = (metrics.get("near_duplicates") or {}).get("share_above_0.99")
    cells = [f"`{name}`", f"{metrics['accuracy']:.4f} ({low:.3f}-{high:.3f})",
             f"{metrics['macro_f1']:.4f}", f"{_recall(metrics, 'meningioma'):.3f}",
             f"{nn:.4f}", f"{100 * (metrics['accuracy'] - nn):+.1f}",
             f"{plain['accuracy']:.4f}" if plain else "n/a",
             f"{similar:.3f}" if similar is not None else "n/a",
             f"{metrics['best_epoch']}/{metrics['config']['epochs']}",
             f"{record['wall_s'] / 60:.1f}", f"{metrics['training_images_per_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| row | test accuracy (95% CI) | macro-F1 | meningioma recall | 1-NN baseline | "
    "margin (points) | without TTA | test share > 0.99 similar | best epoch | wall min | "
    "train img/s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table(root: str) -> str:
    lines = [TABLE_HEADER]
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        run_dir = _run_dir(root, name)
        if not os.path.isdir(run_dir):  # logs kept beside the rows
            continue
        try:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = json.load(f)
            with open(os.path.join(run_dir, "study.json")) as f:
                record = json.load(f)
        except FileNotFoundError:
            continue
        lines.append(table_row(name, metrics, record))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="class-folder tree to train on")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of the rows' run dirs")
    parser.add_argument("--run", nargs="*", default=[],
                        help="rows to train, in order; NAME_sN runs row NAME with --seed N")
    parser.add_argument("--record", nargs="*", default=[],
                        help="write study.json for finished rows trained outside this command")
    parser.add_argument("--list", action="store_true", help="print the rows and their flags")
    parser.add_argument("--table", action="store_true", help="print the table of finished rows")
    args = parser.parse_args(argv)
    if args.list:
        for name, flags in ROWS.items():
            print(f"{name}: {' '.join(flags)}")
    for name in args.record:
        print(json.dumps(record_finished(name, args.root)), flush=True)
    for name in args.run:
        record = run_row(name, args.root, args.data)
        print(json.dumps(record), flush=True)
        if record["returncode"] != 0:
            print(f"row {name} failed; see {_run_dir(args.root, name)}/train.log",
                  file=sys.stderr)
    if args.table:
        print(table(args.root))


if __name__ == "__main__":
    main()
