"""Tests for brainray.console: brainray's lines on the console, Ray's output in the log file."""

from __future__ import annotations

import io
import os

import pytest

from brainray import console as console_module
from brainray.console import Console, EventPump, Events, captured, say
from tests.conftest import brainray_cli, tiny_dataset_files, write_tree


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


@pytest.mark.slow
@pytest.mark.ray
def test_the_console_of_train_and_score_shows_brainrays_lines_and_not_rays(trained_run,
                                                                          tmp_path):
    # Given `brainray train` of 2 epochs on a tiny folder, run from a shell as a user would
    # (the session's shared run: the console is the same at any size, and the embedded
    # sample's default run is README command 1), and a small folder to score
    train, run_dir = trained_run.console, trained_run.run_dir
    inputs = write_tree(tmp_path / "in", {k: v for k, v in tiny_dataset_files(2).items()})

    # When scoring it, also from a shell
    score = brainray_cli("score", "--model", str(run_dir), "--input", str(inputs), "--output",
                         str(tmp_path / "scores"), cwd=tmp_path)

    # Then each console holds brainray's own lines: the log's place, one line per epoch, the
    # final summary; and none of Ray's dumps, warnings or worker echoes
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
