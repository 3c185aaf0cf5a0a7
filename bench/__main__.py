"""The whole benchmark suite in one run, on real images, with a Markdown summary.

    python -m bench [--data ../shared/data/brain-tumor-mri/Training] [--out bench-results.json]
                    [--quick] [--time-to-accuracy RUN_DIR] [--archives] [--history]

Runs (1) bench.compute, (2)+(3) bench.training, (4) bench.scoring, (5) bench.scaling and, with
--time-to-accuracy, (6) bench.time_to_accuracy (trains if RUN_DIR has no finished run), and with
--archives, (7) bench.archives (a 300 MiB and a 3 GiB tar on a moto S3 server), and with
--history, (8) bench.history on a moto S3 server (finding what is already scored after 100 runs
of 1,000 rows against 1 run of 100,000). Every
figure and its reference are measured side by side in this run; the training and scoring jobs
and their baselines run twice each, alternately, and are averaged. About 25 minutes on 2 cores
(--quick: about 8, smaller sizes and shorter timings, for checking the suite works). Nothing
else should run on the machine meanwhile: these are throughput measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform

import torch

from bench import archives, compute, history, scaling, scoring, time_to_accuracy, training
from bench.common import DEFAULT_DATA

TARGETS = {"train_step": 3.0, "pipeline": 0.9, "peer": 1.0, "score_limit": 0.9,
           "score_plain": 1.0, "flat": 0.10, "history_flat": 1.5}


def _row(name: str, ours: str, reference: str, value: float | None, target: str,
         met: bool | None) -> str:
    shown = "n/a" if value is None else f"{value:.2f}"
    verdict = "n/a" if met is None else ("met" if met else "**missed**")
    return f"| {name} | {ours} | {reference} | {shown} | {target} | {verdict} |"


def _compute_rows(c: dict) -> list[str]:
    rows = []
    rows.append(_row("(1) train step, img/s", f"{c['fastest_train_images_per_s']} "
                     f"({c['fastest_train_precision']}, channels-last)",
                     f"{c['naive_fp32_nchw_train_images_per_s']} (naive fp32 NCHW)",
                     c["fastest_vs_naive_train"], ">= 3.0",
                     c["fastest_vs_naive_train"] >= TARGETS["train_step"]))
    if "bf16_stem_vs_naive_train" in c:
        rows.append(_row("(1) train step, opt-in `--precision bf16-stem`, img/s",
                         f"{c['brainray_bf16-stem_train_images_per_s']}",
                         f"{c['naive_fp32_nchw_train_images_per_s']} (naive fp32 NCHW)",
                         c["bf16_stem_vs_naive_train"], "", None))
    rows.append(_row("(1) inference, img/s", f"{c['fastest_infer_images_per_s']} "
                     f"({c['fastest_infer_precision']}, channels-last)",
                     f"{c['naive_fp32_nchw_infer_images_per_s']} (naive fp32 NCHW)",
                     c["fastest_vs_naive_infer"], "", None))
    return rows


def _training_rows(t: dict) -> list[str]:
    rows = []
    ours = t["brainray"]["steady_train_images_per_s"]
    if "brainray_vs_compute_limit" in t:
        rows.append(_row("(2) `brainray train` vs compute limit, img/s", f"{ours}",
                         f"{t['compute_limit_train_images_per_s']} (1)",
                         t["brainray_vs_compute_limit"], ">= 0.9",
                         t["brainray_vs_compute_limit"] >= TARGETS["pipeline"]))
    rows.append(_row("(3) `brainray train` vs torchvision DataLoader(num_workers=2), img/s",
                     f"{ours}",
                     f"{t['torchvision_dataloader']['steady_train_images_per_s']}",
                     t["brainray_vs_torchvision"], ">= 1.0",
                     t["brainray_vs_torchvision"] >= TARGETS["peer"]))
    return rows


def _scoring_rows(s: dict) -> list[str]:
    rows = []
    ours = (f"{s['brainray']['steady_images_per_s']} steady (job: "
            f"{s['brainray']['job_images_per_s']}, {s['brainray']['fixed_startup_s']} s "
            "start-up)")
    rows.append(_row("(4) `brainray score` vs inference limit, img/s", ours,
                     f"{s['inference_limit_images_per_s']}",
                     s["brainray_vs_inference_limit"], ">= 0.9",
                     s["brainray_vs_inference_limit"] >= TARGETS["score_limit"]))
    rows.append(_row("(4) `brainray score` vs plain PIL + torch loop, img/s", f"{ours}",
                     f"{s['plain_loop_images_per_s']}", s["brainray_vs_plain_loop"],
                     ">= 1.0", s["brainray_vs_plain_loop"] >= TARGETS["score_plain"]))
    return rows


def _scaling_rows(sc: dict) -> list[str]:
    rows = []
    spread = sc["training_time_per_image_spread"]
    rows.append(_row("(5) training epoch time per image, 1x..16x (spread)",
                     " / ".join(str(p["steady_epoch_ms_per_image"])
                                for p in sc["training"]) + " ms", "flat", spread,
                     "<= 0.10", spread <= TARGETS["flat"]))
    spread = sc["scoring_marginal_time_per_image_spread"]
    rows.append(_row("(5) scoring marginal time per image, 1x..16x (spread)",
                     " / ".join(str(p["marginal_ms_per_image"])
                                for p in sc["scoring"][1:]) + " ms", "flat", spread,
                     "<= 0.10", None if spread is None else spread <= TARGETS["flat"]))
    rows.append(_row("(5) peak private memory of all Ray processes, train / score",
                     " / ".join(str(p["peak_process_private_mb"]) for p in sc["training"])
                     + " MB; " + " / ".join(str(p["peak_process_private_mb"])
                                            for p in sc["scoring"]) + " MB",
                     "bounded", None, "flat", None))
    return rows


def _time_to_accuracy_rows(tta: dict) -> list[str]:
    rows = []
    rows.append(_row("(6) time to the paper's 96.88% test accuracy",
                     f"{tta['test_accuracy']:.4f} after {tta['training_wall_min']} min "
                     f"({tta['model']})", f"1-NN baseline {tta['baseline_1nn_test_accuracy']}",
                     None, "<= 15 min", tta["target_reached"]
                     and tta["training_wall_min"] <= 15))
    return rows


def _archive_rows(a: dict) -> list[str]:
    rows = []
    growth = a["private_mb_largest_vs_smallest"]
    rows.append(_row("(7) peak private memory of `brainray score` on a tar on S3, by size",
                     " / ".join(f"{p['peak_process_private_mb']} MB at {p['size_mib']} MiB"
                                for p in a["points"]), "flat", growth, "<= 1.10",
                     growth <= 1 + TARGETS["flat"]
                     and all(p["all_images_scored"] for p in a["points"])))
    return rows


def _history_rows(h: dict) -> list[str]:
    many, one = h["many_runs"], h["one_run"]
    growth = round(many["index_lookup_s"] / max(one["index_lookup_s"], 1e-9), 2)
    return [_row(f"(8) finding what is already scored, {many['runs']} runs vs 1 run of "
                 f"{many['keys']:,} rows, s",
                 f"{many['index_lookup_s']} / {one['index_lookup_s']}",
                 f"reading every published file: {many['reading_every_published_file_s']} / "
                 f"{one['reading_every_published_file_s']}", growth,
                 f"<= {TARGETS['history_flat']}", growth <= TARGETS["history_flat"])]


def summary_table(results: dict) -> str:
    rows = ["| benchmark | brainray | reference | ratio | target | |",
            "|---|---|---|---|---|---|"]
    parts = {"compute": _compute_rows, "training": _training_rows, "scoring": _scoring_rows,
             "scaling": _scaling_rows, "time_to_accuracy": _time_to_accuracy_rows,
             "archives": _archive_rows, "history": _history_rows}
    for key, rows_of in parts.items():
        if results.get(key):
            rows += rows_of(results[key])
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the suite")
    parser.add_argument("--model", default="paper_cnn", choices=["paper_cnn", "bn_cnn"])
    parser.add_argument("--time-to-accuracy", metavar="RUN_DIR", default=None)
    parser.add_argument("--archives", action="store_true",
                        help="also (7): score tars on a moto S3 server (3 GiB: long, ~7 GB disk)")
    parser.add_argument("--history", action="store_true",
                        help="also (8): the already-scored lookup vs the output's history (S3)")
    args = parser.parse_args()
    seconds = "5" if args.quick else "15"
    results: dict = {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                 "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name(0)
                                 if torch.cuda.is_available() else None}}
    results["compute"] = compute.main(["--model", args.model, "--seconds", seconds])
    limit = results["compute"]["fastest_train_images_per_s"]
    results["training"] = training.main(
        ["--data", args.data, "--model", args.model,
         "--images", "600" if args.quick else "2000"]
        + (["--repeats", "1"] if args.quick else []), compute_limit=limit)
    results["scoring"] = scoring.main(["--data", args.data, "--seconds", seconds,
                                       "--images", "500" if args.quick else "3000"]
                                      + (["--repeats", "1"] if args.quick else []))
    results["scaling"] = scaling.main(
        ["--data", args.data, "--model", args.model]
        + (["--train-base", "100", "--score-base", "200", "--factors", "1", "4"]
           if args.quick else []))
    if args.time_to_accuracy:
        results["time_to_accuracy"] = time_to_accuracy.main(
            ["--data", args.data, "--run-dir", args.time_to_accuracy])
    if args.archives:
        results["archives"] = archives.main(
            ["--data", args.data, "--out", os.path.splitext(args.out)[0] + "-archives.json"]
            + (["--sizes-mib", "40", "200"] if args.quick else []))
    if args.history:
        results["history"] = history.main(
            ["--s3"] + (["--runs", "10", "--rows", "200"] if args.quick else []))
    results["summary"] = summary_table(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print("\n" + results["summary"] + f"\n\nall figures: {args.out}", flush=True)


if __name__ == "__main__":
    main()
