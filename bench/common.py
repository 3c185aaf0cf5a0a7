"""What every benchmark shares: real images replicated to a size, checkpoints, timing, memory.

Benchmarks run on real JPEGs from the shared dataset. Larger sizes reuse the same files under
new names (hard links where possible), so every replica is a distinct input to the jobs but the
bytes and decode cost stay those of real scans.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from brainray.checkpoint import make_checkpoint, serialize
from brainray.config import DEFAULT_CLASSES, PreprocessConfig
from brainray.model import build_model

DEFAULT_DATA = "../shared/data/brain-tumor-mri/Training"


def source_files(data: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data, "*", "*.jpg")))
    if not files:
        raise SystemExit(f"no JPEGs under {data}/<class>/: pass --data <folder of class folders>")
    return files


def replicate(files: list[str], n: int, target: Path) -> Path:
    """`n` images laid out as target/<class>/<i>_<name>, cycling through `files` in an
    interleaved class order so any prefix is class-balanced like the whole."""
    by_class: dict[str, list[str]] = {}
    for f in files:
        by_class.setdefault(Path(f).parent.name, []).append(f)
    interleaved = [f for group in zip(*by_class.values(), strict=False) for f in group]
    for i in range(n):
        source = interleaved[i % len(interleaved)]
        dest = target / Path(source).parent.name / f"{i:06d}_{Path(source).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            try:
                os.link(source, dest)
            except OSError:  # another filesystem: copy
                shutil.copyfile(source, dest)
    return target


def untrained_checkpoint(model_name: str, target: Path) -> Path:
    """Throughput does not depend on the weights, so a seeded untrained model stands in."""
    torch.manual_seed(0)
    model = build_model(model_name, len(DEFAULT_CLASSES))
    target.write_bytes(serialize(make_checkpoint(
        model, model_name=model_name, classes=DEFAULT_CLASSES, preprocess=PreprocessConfig(),
        config={}, metrics={}, epoch=0)))
    return target


def rate_for(seconds: float, step: Callable[[], int], warmup_steps: int = 2) -> float:
    """Items per second of `step` (which returns how many items it did), after a warm-up:
    oneDNN and cuDNN choose their kernels on the first calls."""
    for _ in range(warmup_steps):
        step()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
    sync()
    return done / (time.perf_counter() - start)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


_PLASMA = re.compile(r"Plasma memory usage (\d+) MiB")
_SPILLED = re.compile(r"Spilled (\d+) MiB")


class MemorySampler:
    """Peak memory of this process and every process it started (the local Ray cluster: GCS,
    raylet, workers), sampled every `interval` s in a thread, plus Ray's object store use.

    RSS counts the object store's shared pages once in every process that maps them, so the
    process figure is RSS minus shared pages (private memory), and the object store is reported
    on its own from Ray's memory summary.
    """

    def __init__(self, interval: float = 1.0, root_pid: int | None = None):
        self.interval = interval
        self.root_pid = root_pid  # None: this process; else another's tree (a CLI subprocess)
        self.peak_private_mb = 0.0
        self.peak_rss_mb = 0.0
        self.peak_driver_mb = (0.0, 0.0)  # (private, RSS) of the root process
        self.peak_object_store_mb = 0.0
        self.peak_spilled_mb = 0.0
        self.peak_by_process: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            per_process = memory_by_process(self.root_pid)
            self.peak_private_mb = max(self.peak_private_mb,
                                       sum(mb for mb, _, _ in per_process.values()))
            self.peak_rss_mb = max(self.peak_rss_mb,
                                   sum(rss for _, rss, _ in per_process.values()))
            for pid, (mb, rss, name) in per_process.items():
                if mb > self.peak_by_process.get(pid, (0.0, ""))[0]:
                    self.peak_by_process[pid] = (mb, name)
                if name == "driver":
                    self.peak_driver_mb = (max(self.peak_driver_mb[0], mb),
                                           max(self.peak_driver_mb[1], rss))
            if self.root_pid is not None:
                continue  # Ray's memory summary answers only the process that joined the cluster
            store, spilled = object_store_mb()
            self.peak_object_store_mb = max(self.peak_object_store_mb, store)
            self.peak_spilled_mb = max(self.peak_spilled_mb, spilled)

    def report(self, largest: int = 5) -> dict:
        """Peaks, plus the `largest` processes' own peaks (named as they were at their peak:
        Ray workers rename themselves after the task or actor they run), which is where to look
        when the total grows."""
        top = sorted(self.peak_by_process.items(), key=lambda item: -item[1][0])[:largest]
        return {"peak_process_private_mb": round(self.peak_private_mb),
                "peak_object_store_mb": round(self.peak_object_store_mb),
                "peak_spilled_mb": round(self.peak_spilled_mb),
                "peak_process_rss_mb": round(self.peak_rss_mb),
                "peak_driver_private_mb": round(self.peak_driver_mb[0]),
                "peak_driver_rss_mb": round(self.peak_driver_mb[1]),
                "peak_private_mb_largest_processes": {
                    f"{name} ({pid})": round(mb) for pid, (mb, name) in top}}


def private_memory_by_process() -> dict[int, tuple[float, str]]:
    """{pid: (private MB, name)} for this process ("driver") and every process it started."""
    return {pid: (mb, name) for pid, (mb, _, name) in memory_by_process().items()}


def memory_by_process(root_pid: int | None = None) -> dict[int, tuple[float, float, str]]:
    """{pid: (private MB, RSS MB, name)} for the root process ("driver"; default this one) and
    every process it started; empty once the root has exited."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for process in processes:
        try:
            info = process.memory_info()
            name = "driver" if process.pid == root.pid else process.name()
            out[process.pid] = ((info.rss - getattr(info, "shared", 0)) / 2**20,
                                info.rss / 2**20, name)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def object_store_mb() -> tuple[float, float]:
    import ray
    from ray._private.internal_api import memory_summary

    if not ray.is_initialized():
        return 0.0, 0.0
    try:
        summary = memory_summary(stats_only=True)
    except Exception:  # the cluster is shutting down between samples
        return 0.0, 0.0
    store, spilled = _PLASMA.search(summary), _SPILLED.search(summary)
    return (float(store.group(1)) if store else 0.0, float(spilled.group(1)) if spilled else 0.0)


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def mean_of_runs(runs: list[dict], key: str) -> dict:
    """The last run's figures with `key` replaced by its mean over all runs, plus every run's value.

    On a small shared VM whole runs vary by +-5% (which cores Ray's processes land on, noisy
    neighbours), more than the differences being measured, so compared jobs are run alternately
    and averaged rather than trusted from one run each.
    """
    values = [run[key] for run in runs]
    return {**runs[-1], key: round(sum(values) / len(values), 1), f"{key}_runs": values}
