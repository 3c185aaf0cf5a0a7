"""Tests for brainray.console: brainray's lines on the console, Ray's output in the log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from brainray import console as console_module
from brainray.console import Console, EventPump, Events, captured, say
from tests.conftest import FAST, tiny_dataset_files, write_tree


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_lines_come_at_most_every_interval(monkeypatch):
    # Given a console on a pipe (not a terminal) and a clock we move by hand
    clock = [1000.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    out = Console(stream)
    # When progress is reported four times within and across the interval
    for step in (0.0, 10.0, 29.0, 31.0):
        clock[0] = 1000.0 + step
        out.progress(int(step), 100, "scoring", "", plain=lambda s=step: f"at {s:.0f}")
    # Then only the first report and the one after 30 s became lines
    assert stream.getvalue().splitlines() == ["at 0", "at 31"]


def test_progress_without_a_plain_line_prints_nothing_off_a_terminal():
    stream = io.StringIO()
    Console(stream).progress(5, 10, "epoch 1/2", "loss 0.1")
    assert stream.getvalue() == ""


def test_on_a_terminal_progress_is_a_bar_and_lines_print_above_it():
    stream = _Terminal()
    out = Console(stream)
    out.progress(3, 10, "epoch 1/2", "loss 0.5")
    out.line("resuming from the checkpoint")
    out.close_bar()
    text = stream.getvalue()
    assert "epoch 1/2" in text and "3/10" in text and "loss 0.5" in text
    assert "resuming from the checkpoint\n" in text


def test_captured_sends_file_descriptor_output_to_the_log_and_say_to_the_console(tmp_path,
                                                                               capfd):
    log = tmp_path / "logs" / "run.log"
    # When something writes straight to the process's stdout and stderr (as Ray's C++ core
    # worker and its log forwarding do) and brainray says a line
    with captured(str(log)):
        os.write(1, b"(RayTrainWorker pid=1) logging_progress noise\n")
        os.write(2, b"core_worker.cc:2330: E noise\n")
        print("a stray print")
        say("epoch 1/2  train loss 0.5")
    # Then the console shows only brainray's line and the log holds the rest
    out, err = capfd.readouterr()
    assert out == "epoch 1/2  train loss 0.5\n" and err == ""
    logged = log.read_text()
    assert "logging_progress noise" in logged and "core_worker.cc" in logged
    assert "a stray print" in logged and "epoch 1/2" not in logged


def test_captured_restores_the_streams_after_an_error(tmp_path, capfd):
    with pytest.raises(RuntimeError), captured(str(tmp_path / "x.log")):
        raise RuntimeError("job failed")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_without_a_log_file_nothing_is_redirected(capfd):
    with captured(None):
        os.write(1, b"verbose ray output\n")
        say("mine")
    assert capfd.readouterr().out == "verbose ray output\nmine\n"


@pytest.mark.ray
def test_events_sent_from_a_ray_task_reach_the_drivers_handler(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def worker(events: Events) -> None:
        for i in range(3):
            events.send("files", i + 1)

    events = Events()
    seen: list = []
    with EventPump(events, lambda kind, payload: seen.append((kind, payload))):
        ray.get(worker.remote(events))
    events.shutdown()
    assert seen == [("files", 1), ("files", 2), ("files", 3)]


# --- what a user sees: the CLI in a subprocess, as on a pipe (CI, cron, ray job logs) ---------

RAY_NOISE = ("logging_progress", "Active & requested resources", "core_worker.cc",
             "tqdm is not installed", "RayDeprecationWarning", "(RayTrainWorker", "(MapWorker")


def _brainray(*args: str, cwd) -> subprocess.CompletedProcess:
    # The session's cluster, as a user's `ray start` one: a fresh local Ray per command added
    # two start-ups on 2 CPUs (~55 s of this test) and nothing brainray's console decides
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, "-c", "from brainray.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.ray
def test_the_console_of_train_and_score_shows_brainrays_lines_and_not_rays(ray_cluster,
                                                                          tmp_path):
    # Given a tiny labeled folder and a small folder to score (the console is the same at any
    # size; the embedded sample's default run is README command 1)
    run_dir = tmp_path / "run"
    data = write_tree(tmp_path / "data", tiny_dataset_files(per_class=8))
    inputs = write_tree(tmp_path / "in", {k: v for k, v in tiny_dataset_files(2).items()})

    # When training 2 epochs and scoring, as a user would from a shell
    train = _brainray("train", "--data", str(data), "--run-dir", str(run_dir), "--epochs", "2",
                      *FAST, cwd=tmp_path)
    score = _brainray("score", "--model", str(run_dir), "--input", str(inputs), "--output",
                      str(tmp_path / "scores"), cwd=tmp_path)

    # Then each console holds brainray's own lines: the log's place, one line per epoch, the
    # final summary; and none of Ray's dumps, warnings or worker echoes
    assert train.returncode == 0, train.stderr[-2000:]
    assert score.returncode == 0, score.stderr[-2000:]
    lines = train.stdout.splitlines()
    assert lines[0].startswith(f"Ray's own output goes to {run_dir}/logs/train-")
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert any(line.startswith("test set (") for line in lines)
    assert lines[-1] == f"run written to {run_dir}"
    assert any(line.startswith("scored 8 image(s) from 8 file(s)") for line in
               score.stdout.splitlines())
    for noise in RAY_NOISE:
        assert noise not in train.stdout + train.stderr, noise
        assert noise not in score.stdout + score.stderr, noise
    # and the log file holds what Ray said
    (log,) = (run_dir / "logs").glob("train-*.log")
    assert "ray" in log.read_text().lower()
