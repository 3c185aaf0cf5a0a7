"""The benchmark suite's pure parts: data replication, reports and the summary table.

The measurements themselves are run by `python -m bench`, never by the tests (no timed asserts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench import compute, leakage, scaling, study, time_to_accuracy
from bench.__main__ import summary_table
from bench.common import mean_of_runs, replicate
from brainray.config import TrainConfig
from brainray.model import build_model


def _sources(tmp_path: Path) -> list[str]:
    files = []
    for label, count in (("glioma", 3), ("notumor", 2)):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(count):
            path = tmp_path / "src" / label / f"{i}.jpg"
            path.write_bytes(f"{label}{i}".encode())
            files.append(str(path))
    return files


def test_replicate_makes_distinct_names_for_the_same_bytes_class_by_class(tmp_path):
    target = replicate(_sources(tmp_path), 7, tmp_path / "out")
    made = sorted(target.glob("*/*.jpg"))
    assert len(made) == 7
    assert {p.parent.name for p in made} == {"glioma", "notumor"}
    assert len({p.name for p in made}) == 7
    for path in made:  # every replica carries a real source's bytes, under its class
        assert path.read_bytes().decode().startswith(path.parent.name)
    # classes interleave, so a prefix keeps the class mix
    first_two = sorted(p for p in made if p.name.startswith(("000000_", "000001_")))
    assert {p.parent.name for p in first_two} == {"glioma", "notumor"}
    assert os.stat(made[0]).st_nlink >= 2  # hard links, not copies


def test_naive_paper_cnn_has_the_same_parameters_as_brainrays():
    naive = compute.NaivePaperCNN()
    ours = build_model("paper_cnn", 4)
    ours.load_state_dict(naive.state_dict())  # same names and shapes
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(naive.eval()(x), ours.eval()(x))


def test_mean_of_runs_averages_one_figure_and_keeps_every_run():
    runs = [{"rate": 50.0, "wall_s": 10.0}, {"rate": 56.0, "wall_s": 9.0}]
    assert mean_of_runs(runs, "rate") == {"rate": 53.0, "rate_runs": [50.0, 56.0], "wall_s": 9.0}


def test_scaling_trains_small_sizes_for_more_epochs_to_cover_enough_images():
    assert scaling.epochs_for(250, 2) == 1 + 8  # 200 training images an epoch
    assert scaling.epochs_for(1000, 2) == 1 + 2
    assert scaling.epochs_for(4000, 2) == 2  # the minimum already covers 3,200
    assert scaling.epochs_for(4000, 3) == 3
    for images in (10, 250, 1000, 4000):
        epochs = scaling.epochs_for(images, 2)
        assert (epochs - 1) * images * scaling.TRAIN_SHARE >= scaling.MIN_STEADY_IMAGES


def test_scaling_steady_time_per_image_leaves_out_the_first_epoch():
    assert scaling.steady_ms_per_image([30.0, 4.0, 5.0, 3.0], 200) == 20.0
    assert scaling.steady_ms_per_image([4.0], 200) == 20.0  # one epoch: all there is


def test_scaling_marginal_time_per_image():
    points = [{"images": 100, "job_s": 10.0}, {"images": 400, "job_s": 13.0},
              {"images": 1600, "job_s": 25.0}]
    assert scaling._marginal(points, "job_s") == [None, 10.0, 10.0]


def _metrics(accuracy: float) -> dict:
    history = [{"epoch": i + 1, "epoch_seconds": 60.0, "val_accuracy": v}
               for i, v in enumerate([0.7, 0.86, 0.91])]
    return {"model_name": "bn_cnn", "accuracy": accuracy, "accuracy_ci95": [0.9, 0.95],
            "training_wall_s": 200.0, "best_epoch": 3, "baseline_1nn": {"accuracy": 0.92},
            "history": history,
            "config": {"model": "bn_cnn", "augment": "light", "lr": 1e-3, "epochs": 3,
                       "patience": 6, "batch_size_per_worker": 32}}


def test_time_to_accuracy_report():
    result = time_to_accuracy.report(_metrics(0.92), target=0.9688)
    assert result["target_reached"] is False
    assert [p["elapsed_min"] for p in result["curve"]] == [1.0, 2.0, 3.0]
    reached = result["first_minute_validation_accuracy_reached"]
    assert reached["0.8500"] == 2.0 and reached["0.9000"] == 3.0 and reached["0.9500"] is None
    assert time_to_accuracy.report(_metrics(0.97), target=0.9688)["target_reached"] is True


def test_summary_table_marks_met_and_missed_targets():
    results = {
        "compute": {"fastest_train_images_per_s": 69.0, "fastest_train_precision": "fp32",
                    "naive_fp32_nchw_train_images_per_s": 23.0, "fastest_vs_naive_train": 3.0,
                    "fastest_infer_images_per_s": 220.0, "fastest_infer_precision": "fp32",
                    "naive_fp32_nchw_infer_images_per_s": 47.0, "fastest_vs_naive_infer": 4.68},
        "training": {"brainray": {"steady_train_images_per_s": 55.0},
                     "torchvision_dataloader": {"steady_train_images_per_s": 50.0},
                     "brainray_vs_torchvision": 1.1, "compute_limit_train_images_per_s": 69.0,
                     "brainray_vs_compute_limit": 0.797},
        "time_to_accuracy": time_to_accuracy.report(_metrics(0.92), target=0.9688),
    }
    table = summary_table(results).splitlines()
    assert len(table) == 2 + 2 + 2 + 1
    row = {line.split("|")[1].strip(): line for line in table[2:]}
    assert row["(1) train step, img/s"].endswith("| met |")
    assert row["(2) `brainray train` vs compute limit, img/s"].endswith("| **missed** |")
    assert "| 1.10 |" in row["(3) `brainray train` vs torchvision DataLoader(num_workers=2), "
                             "img/s"]
    assert row["(6) time to the paper's 96.88% test accuracy"].endswith("| **missed** |")


def _history(many_s: float) -> dict:
    return {"many_runs": {"runs": 100, "rows_per_run": 1000, "keys": 100000,
                          "index_lookup_s": many_s, "reading_every_published_file_s": 3.5},
            "one_run": {"runs": 1, "rows_per_run": 100000, "keys": 100000,
                        "index_lookup_s": 0.14, "reading_every_published_file_s": 0.12}}


def test_summary_table_history_row_is_met_while_the_lookup_stays_flat():
    (flat,) = summary_table({"history": _history(0.15)}).splitlines()[2:]
    assert flat.startswith("| (8) finding what is already scored, 100 runs vs 1 run of "
                           "100,000 rows, s | 0.15 / 0.14 | reading every published file: "
                           "3.5 / 0.12 | 1.07 |") and flat.endswith("| met |")
    (grown,) = summary_table({"history": _history(3.0)}).splitlines()[2:]
    assert grown.endswith("| **missed** |")


def test_gpu_check_without_cuda_says_so_and_fails(tmp_path, monkeypatch):
    from bench import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert json.loads(out.read_text()) == {"cuda": False,
                                           "error": "no CUDA device: nothing to check here"}


def test_gpu_check_records_a_failing_step_and_goes_on():
    from bench import gpu_check

    steps: dict = {}
    gpu_check._step(steps, "broken", lambda: 1 / 0)
    gpu_check._step(steps, "fine", lambda: {"x": 1})
    assert steps["broken"]["ok"] is False and "ZeroDivisionError" in steps["broken"]["error"]
    assert steps["fine"]["ok"] is True and steps["fine"]["x"] == 1


def test_archives_tar_holds_the_images_and_reaches_the_size_with_filler(tmp_path):
    import tarfile

    from bench import archives

    images = archives.image_files(str(tmp_path / "no-such-data"), 6, tmp_path)
    assert len(images) == 6 and all(name.endswith(".png") for name, _ in images)  # synthetic
    target = 2 * archives.MIB
    built = archives.build_tar(tmp_path / "a.tar", images, target)
    assert built["tar_bytes"] == (tmp_path / "a.tar").stat().st_size >= target
    assert built["tar_bytes"] < target + 64 * 1024  # the filler fills, it does not overshoot
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert sorted(n for n in names if n.startswith("images/")) == sorted(n for n, _ in images)
    fillers = [m for m in members if m.name.startswith("filler/")]
    assert len(fillers) == built["filler_members"] >= 1
    assert sum(m.size for m in fillers) == built["filler_bytes"]
    assert names[-1].startswith("images/")  # images after the last filler: read to the end


def test_archives_filler_is_split_into_members_under_the_cap():
    from bench import archives

    sizes = archives.filler_sizes(3072 * archives.MIB, [100_000] * 64)
    assert len(sizes) == 12 and max(sizes) <= archives.FILLER_MAX_BYTES
    assert archives.filler_sizes(10_000, [100_000]) == []  # the images alone are enough


def test_archives_summary_table_compares_the_largest_with_the_smallest():
    from bench import archives

    point = {"tar_bytes": 300 * archives.MIB, "images_in_tar": 64, "rows_ok": 64,
             "job_wall_s": 30.0, "peak_driver_rss_mb": 500, "peak_process_private_mb": 1500,
             "peak_process_rss_mb": 4000, "moto_peak_rss_mb": 900, "all_images_scored": True,
             "size_mib": 300}
    result = {"points": [point, {**point, "tar_bytes": 3072 * archives.MIB, "size_mib": 3072,
                                 "moto_peak_rss_mb": 7000, "all_images_scored": False}],
              "private_mb_largest_vs_smallest": 1.02, "rss_mb_largest_vs_smallest": 1.01}
    lines = archives.summary_table(result).splitlines()
    assert lines[2] == "| 300 | 64 | 64 | 30.0 | 500 | 1500 / 4000 | 900 | yes |"
    assert lines[3].startswith("| 3072 |") and lines[3].endswith("| 7000 | NO |")
    assert "largest vs smallest archive: 1.02 (RSS: 1.01)" in lines[-1]
    suite = summary_table({"archives": result}).splitlines()[-1]
    assert "1500 MB at 300 MiB / 1500 MB at 3072 MiB" in suite
    assert suite.endswith("| **missed** |")  # flat, but not every image was scored


def _finished_row(run_dir: Path, accuracy: float) -> None:
    run_dir.mkdir(parents=True)
    metrics = {"accuracy": accuracy, "accuracy_ci95": [accuracy - 0.01, accuracy + 0.01],
               "macro_f1": accuracy, "per_class": {"meningioma": {"recall": 0.95}},
               "baseline_1nn": {"accuracy": 0.9}, "best_epoch": 40, "config": {"epochs": 45},
               "training_images_per_s": 160.0}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "study.json").write_text(json.dumps({"wall_s": 1410.0}))


def test_the_study_table_has_a_row_per_finished_run_and_skips_the_rest(tmp_path):
    # given a finished row, one still training (no study.json) and a queue log beside them
    _finished_row(tmp_path / "bn128_s1", 0.9738)
    (tmp_path / "bn160_s1").mkdir()
    (tmp_path / "bn160_s1" / "config.json").write_text("{}")
    (tmp_path / "queue.log").write_text("started")
    # when tabulated / then only the finished row is there, with its margin and wall minutes
    lines = study.table(str(tmp_path)).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| `bn128_s1` | 0.9738 (0.964-0.984) |")
    assert "| +7.4 |" in lines[2] and "| 23.5 | 160 |" in lines[2]


def _index(n_per_class: int, twins: int) -> pd.DataFrame:
    """A decoded index as `load_labeled` returns it: distinct random thumbnails, except that the
    first `twins` images of each class have a near-copy (thumbnail + 1) beside them."""
    rng = np.random.default_rng(0)
    rows = []
    for label in range(4):
        thumbs = [rng.integers(0, 250, (32, 32), dtype=np.uint8) for _ in range(n_per_class)]
        thumbs += [t + 1 for t in thumbs[:twins]]
        rows += [{"path": f"/d/{label}/{i:03d}.png", "label": label, "sha256": f"{label}-{i}",
                  "fingerprint": int(rng.integers(0, 2**63)), "thumbnail": t, "error": ""}
                 for i, t in enumerate(thumbs)]
    return pd.DataFrame(rows)


def test_leakage_measures_the_stricter_grouping_on_the_same_decoded_data():
    # given 4 classes of 20 distinct images, 5 of each with a near-copy beside it (100 images)
    index = _index(20, 5)
    # when measured with the hash grouping and with similarity linking
    config = TrainConfig(data="/d", run_dir="")
    plain, strict = (leakage.measure(index, config, 0, similarity) for similarity in (0.0, 0.99))
    # then linking joins each near-copy to its image: 20 groups fewer, on the same images
    assert (plain["n_groups"], strict["n_groups"]) == (100, 80)
    assert 0.0 <= strict["baseline_1nn_accuracy"] <= 1.0 and strict["n_test"] > 0
    assert set(strict["near_duplicates"]) >= {"share_above_0.95", "share_above_0.99"}


@pytest.mark.s3
def test_ranged_moto_serves_a_range_from_the_stored_file_and_a_plain_get_whole(monkeypatch):
    # Given moto patched by bench.ranged_moto, with a counter on its whole-body read
    import boto3
    from moto.server import ThreadedMotoServer

    from bench import ranged_moto
    from tests.conftest import _free_port

    whole_reads = []
    plain = ranged_moto._plain_value
    monkeypatch.setattr(ranged_moto, "_plain_value", property(
        lambda key: whole_reads.append(key.name) or plain.fget(key), plain.fset))
    restore = ranged_moto.install()
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                              region_name="us-east-1")
        bucket = "bench-ranged"
        client.create_bucket(Bucket=bucket)
        body = np.random.default_rng(0).bytes(3 * 2**20)
        client.put_object(Bucket=bucket, Key="big", Body=body)
        whole_reads.clear()
        # When a range, a suffix range and the whole object are read
        ranged = client.get_object(Bucket=bucket, Key="big", Range="bytes=1000000-1999999")
        suffix = client.get_object(Bucket=bucket, Key="big", Range="bytes=-10")["Body"].read()
        ranges_read_whole = list(whole_reads)
        whole = client.get_object(Bucket=bucket, Key="big")["Body"].read()
    finally:
        server.stop()
        restore()
    # Then the ranges are the right bytes with S3's headers, and only the plain GET read it all
    assert ranged["Body"].read() == body[1000000:2000000]
    assert ranged["ContentRange"] == f"bytes 1000000-1999999/{len(body)}"
    assert suffix == body[-10:] and whole == body
    assert ranges_read_whole == [] and whole_reads == ["big"]
