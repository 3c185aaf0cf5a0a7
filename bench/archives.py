"""(7) Scoring a tar on S3 (a moto server): peak memory must not grow with the archive's size.

    python -m bench.archives [--sizes-mib 300 3072] [--images 64] [--out archives.json]

Every archive holds the same images (real JPEGs from --data, else synthetic PNGs) spread between
non-image filler members, so it grows while the scoring work stays the same; the last images sit
after the last filler, so rows == images means the whole stream was read. Each tar is written to
a temporary file as a stream, uploaded (multipart), and scored by `brainray score` in its own
process against the moto server's endpoint. Memory is sampled over that process ("driver") and
every process it starts (the local Ray cluster); the moto server holds the objects itself and is
measured apart, never counted as brainray's.

Needs free disk for one tar plus moto's copy of it (about twice the largest size). Plain moto
reads the whole object for every ranged GET (8 MiB each here): 0.19 s per request at 200 MiB,
seconds at 3 GiB, where brainray's S3 client (rightly) gives up on a request that sends nothing
for 3 s. So the server here is `bench.ranged_moto`, moto with ranged GETs that read only their
range, as S3 serves them; `moto_ranged_get_s` records what one request costs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import DEFAULT_DATA, MemorySampler, ratio, replicate, untrained_checkpoint
from brainray import publish
from brainray.config import DEFAULT_CLASSES, StorageOptions

MIB = 2**20
FILLER_MAX_BYTES = 256 * MIB  # per filler member: under unpack's per-member limit, were it read
BUCKET = "bench-archives"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEBRAINRAYBENCH",
                    "AWS_SECRET_ACCESS_KEY": "brainray-bench-fake-secret",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# --- the archives (pure: no S3, no Ray) -------------------------------------------------------


def image_files(data: str, n: int, workdir: Path) -> list[tuple[str, Path]]:
    """(member name, file) for `n` images: real JPEGs from `data` when it holds any, else
    synthetic PNGs (so the benchmark runs anywhere)."""
    sources = sorted(Path(data).glob("*/*.jpg")) if os.path.isdir(data) else []
    folder = (replicate([str(s) for s in sources], n, workdir / "images") if sources
              else synthetic_images(n, workdir / "images"))
    return [(f"images/{p.parent.name}/{p.name}", p) for p in sorted(folder.glob("*/*"))]


def synthetic_images(n: int, target: Path, size: int = 256) -> Path:
    """Noise plus a class-dependent bright blob, one PNG each, under target/<class>/."""
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        label = DEFAULT_CLASSES[i % len(DEFAULT_CLASSES)]
        cx, cy = (0.3 + 0.4 * (i % 2), 0.3 + 0.4 * (i // 2 % 2))
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        noise = np.random.default_rng(i).random((size, size))
        pixels = np.clip(80 * noise + 170 * blob, 0, 255).astype(np.uint8)
        path = target / label / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)
    return target


def _tar_bytes(size: int) -> int:
    """What one member takes in a tar: a 512-byte header, then its data padded to 512."""
    return 512 + -(-size // 512) * 512


def filler_sizes(target_bytes: int, image_sizes: list[int]) -> list[int]:
    """Sizes of the filler members that bring a tar of these images to at least `target_bytes`:
    as few as FILLER_MAX_BYTES allows, all about equal."""
    left = target_bytes - sum(_tar_bytes(s) for s in image_sizes) - 1024  # end-of-archive
    if left <= 0:
        return []
    count = -(-left // (FILLER_MAX_BYTES + 512))
    each = -(-(left - 512 * count) // count)
    return [max(0, each)] * count


class _Filler(io.RawIOBase):
    """`size` cheap bytes: one random MiB over and over, so nothing can compress or dedupe it."""

    _BLOCK = np.random.default_rng(0).bytes(MIB)

    def __init__(self, size: int):
        super().__init__()
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        n = min(n, MIB)
        self._left -= n
        return self._BLOCK[:n]


def build_tar(path: Path, images: list[tuple[str, Path]], target_bytes: int) -> dict:
    """A tar at `path` of the images split into groups between filler members (the last group
    after the last filler), written member by member: never held in memory."""
    fillers = filler_sizes(target_bytes, [p.stat().st_size for _, p in images])
    groups = np.array_split(np.arange(len(images)), len(fillers) + 1)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for index, group in enumerate(groups):
            for i in group:
                tar.add(images[i][1], arcname=images[i][0], recursive=False)
            if index < len(fillers):
                info = tarfile.TarInfo(f"filler/blob-{index:04d}.bin")
                info.size = fillers[index]
                tar.addfile(info, _Filler(info.size))
    return {"tar_bytes": path.stat().st_size, "images_in_tar": len(images),
            "filler_members": len(fillers), "filler_bytes": sum(fillers)}


# --- the moto server and the scoring job ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[tuple[str, int]]:
    """(endpoint, pid) of a moto S3 server (`bench.ranged_moto`) on 127.0.0.1 in its own
    process, apart so that its memory (it keeps every object) is never counted as the job's."""
    port = _free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "bench.ranged_moto", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint, server)
        yield endpoint, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_until_up(endpoint: str, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the moto server exited with {server.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            return
        time.sleep(0.5)
    raise SystemExit(f"the moto server did not answer at {endpoint} in {timeout_s:.0f} s")


def _s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    # generous timeouts: moto assembles a multipart upload in memory before it answers
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(read_timeout=600, retries={"max_attempts": 2}))


def upload(client, path: Path, key: str) -> dict:
    """Multipart upload (boto3 splits anything over 8 MiB into parts), plus how long the server
    takes to answer one 8 MiB ranged GET of it."""
    start = time.perf_counter()
    client.upload_file(str(path), BUCKET, key)
    uploaded = time.perf_counter() - start
    start = time.perf_counter()
    client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes=0-{8 * MIB - 1}")["Body"].read()
    return {"upload_s": round(uploaded, 1),
            "moto_ranged_get_s": round(time.perf_counter() - start, 2)}


def score(checkpoint: Path, uri: str, output: str, endpoint: str, moto_pid: int) -> dict:
    """`brainray score` in its own process, its memory and the moto server's sampled apart."""
    command = [sys.executable, "-c", "from brainray.cli import main; main()", "score",
               "--model", str(checkpoint), "--input", uri, "--output", output,
               "--s3-endpoint", endpoint]
    env = {**os.environ, **FAKE_CREDENTIALS}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, started and stopped by the job
    with MemorySampler(interval=0.5, root_pid=moto_pid) as moto:
        start = time.perf_counter()
        job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
        with MemorySampler(interval=0.5, root_pid=job.pid) as memory:
            console = job.communicate()[0].decode(errors="replace")
        wall = time.perf_counter() - start
    if job.returncode != 0:
        raise SystemExit(f"brainray score failed ({job.returncode}):\n{console[-4000:]}")
    report = memory.report()
    return {"job_wall_s": round(wall, 1),
            **{k: report[k] for k in ("peak_driver_rss_mb", "peak_driver_private_mb",
                                      "peak_process_rss_mb", "peak_process_private_mb",
                                      "peak_private_mb_largest_processes")},
            "moto_peak_rss_mb": moto.report()["peak_process_rss_mb"]}


def scored_rows(output: str, endpoint: str) -> dict:
    """What the committed run holds: its summary, and the archive members its rows came from."""
    options = StorageOptions(s3_endpoint=endpoint, s3_region="us-east-1")
    run = publish.committed_runs(output, options)[-1]
    members = [m for uri in publish.published_files(output, options)
               for m in publish.read_columns(uri, (publish.COL_MEMBER,), options)
               .column(0).to_pylist()]
    return {"rows": run["images"], "rows_ok": run["ok"], "rows_error": run["errors"],
            "scoring_wall_s": round(run["wall_s"], 1),
            "distinct_image_members": len({m for m in members if m and m.startswith("images/")})}


# --- the measurement ----------------------------------------------------------------------------


def measure_size(size_mib: int, images: list[tuple[str, Path]], checkpoint: Path,
                 workdir: Path, endpoint: str, moto_pid: int) -> dict:
    key, tar = f"archive-{size_mib}.tar", workdir / f"archive-{size_mib}.tar"
    point: dict = {"size_mib": size_mib, **build_tar(tar, images, size_mib * MIB)}
    point.update(upload(_s3_client(endpoint), tar, key))
    tar.unlink()  # moto has its own copy; the disk holds one archive at a time
    output = f"s3://{BUCKET}/scores-{size_mib}"
    point.update(score(checkpoint, f"s3://{BUCKET}/{key}", output, endpoint, moto_pid))
    point.update(scored_rows(output, endpoint))
    point["all_images_scored"] = (point["rows"] == point["rows_ok"] == point["images_in_tar"]
                                  == point["distinct_image_members"])
    return point


def measure(sizes_mib: list[int], data: str, n_images: int, model: str | None) -> dict:
    os.environ.update(FAKE_CREDENTIALS)  # for this process's boto3 and pyarrow clients
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = Path(model) if model else untrained_checkpoint("paper_cnn",
                                                                    workdir / "model.pt")
        images = image_files(data, n_images, workdir)
        with moto_server(workdir / "moto.log") as (endpoint, moto_pid):
            _s3_client(endpoint).create_bucket(Bucket=BUCKET)
            for size in sizes_mib:
                points.append(measure_size(size, images, checkpoint, workdir, endpoint,
                                           moto_pid))
                print(json.dumps(points[-1]), flush=True)
    small, large = points[0], points[-1]
    return {"images": len(images), "real_jpegs": images[0][0].endswith(".jpg"),
            "model": model or "paper_cnn (untrained)", "points": points,
            "private_mb_largest_vs_smallest": ratio(large["peak_process_private_mb"],
                                                    small["peak_process_private_mb"]),
            "rss_mb_largest_vs_smallest": ratio(large["peak_process_rss_mb"],
                                                small["peak_process_rss_mb"])}


def summary_table(result: dict) -> str:
    rows = ["| tar MiB | images | rows ok | job s | driver RSS MB | all processes private / "
            "RSS MB | moto RSS MB | all scored |", "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        rows.append(f"| {p['tar_bytes'] / MIB:.0f} | {p['images_in_tar']} | {p['rows_ok']} | "
                    f"{p['job_wall_s']} | {p['peak_driver_rss_mb']} | "
                    f"{p['peak_process_private_mb']} / {p['peak_process_rss_mb']} | "
                    f"{p['moto_peak_rss_mb']} | {'yes' if p['all_images_scored'] else 'NO'} |")
    rows.append(f"\nbrainray's peak private memory, largest vs smallest archive: "
                f"{result['private_mb_largest_vs_smallest']} (RSS: "
                f"{result['rss_mb_largest_vs_smallest']}); the moto server is not counted")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="class folders of JPEGs (synthetic PNGs when there are none)")
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[300, 3072])
    parser.add_argument("--images", type=int, default=64, help="images in every archive")
    parser.add_argument("--model", default=None, help="checkpoint (default: untrained paper_cnn)")
    parser.add_argument("--out", default="bench-archives.json")
    args = parser.parse_args(argv)
    result = measure(sorted(args.sizes_mib), args.data, args.images, args.model)
    result["summary"] = summary_table(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n" + result["summary"] + f"\n\nall figures: {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
