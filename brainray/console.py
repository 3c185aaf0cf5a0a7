"""What the person running brainray sees: brainray's own lines and progress, nothing else.

Everything Ray prints (its INFO/WARNING logs, progress dumps, the workers' forwarded output, the
C++ core worker's messages) goes to a log file in the run or output directory instead, unless
--verbose: the process's stdout and stderr file descriptors are pointed at the file, and
brainray writes to copies of the originals. On a terminal brainray draws tqdm progress bars;
elsewhere (CI, `ray job logs`, cron) it writes plain lines, at most one every
PLAIN_INTERVAL_S for progress.

Workers report through `Events` (a Ray queue) and the driver renders them (`EventPump`), so the
console shows the same thing whichever node a worker runs on.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from ray.util.queue import Queue
from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0
POLL_S = 0.2


class Console:
    """brainray's own output: lines, and progress (a bar on a terminal, plain lines elsewhere)."""

    def __init__(self, stream=None):
        self._stream = stream  # None: whatever sys.stdout is at the time of writing
        self._bar: tqdm | None = None
        self._last_plain = 0.0

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, done: int, total: int | None, desc: str, postfix: str,
                 plain: Callable[[], str] | None = None) -> None:
        """Where a task stands: a bar's position on a terminal; elsewhere the line `plain()`
        at most every PLAIN_INTERVAL_S (nothing without `plain`)."""
        if self.tty:
            if self._bar is None or self._bar.desc != desc:
                self.close_bar()
                self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=False,
                                 dynamic_ncols=True)
            self._bar.total = total
            self._bar.n = done
            self._bar.set_postfix_str(postfix, refresh=True)
            return
        now = time.monotonic()
        if plain is not None and now - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = now
            self.line(plain())

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


_CONSOLE: Console | None = None


def console() -> Console:
    """The process's console (stdout until `captured` says otherwise)."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


def say(text: str) -> None:
    console().line(text)


@contextlib.contextmanager
def captured(log_path: str | None) -> Iterator[Console]:
    """Within the block, file descriptors 1 and 2 (and sys.stdout/stderr) write to `log_path`,
    and `console()` to the original stdout; None leaves everything as it is (--verbose)."""
    global _CONSOLE
    if log_path is None:
        yield console()
        return
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    previous = _CONSOLE
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "ab", buffering=0))
        text = stack.enter_context(open(log_path, "a", buffering=1, encoding="utf-8",
                                        errors="backslashreplace"))
        _CONSOLE = Console(stack.enter_context(os.fdopen(
            os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="backslashreplace")))
        stack.callback(_restore, saved, previous, log_path)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python-level writers too, in case sys.stdout is not fd 1 (pytest, notebooks)
        stack.enter_context(contextlib.redirect_stdout(text))
        stack.enter_context(contextlib.redirect_stderr(text))
        yield _CONSOLE


def _restore(saved: tuple[int, int], previous: Console | None, log_path: str) -> None:
    global _CONSOLE
    _CONSOLE.close_bar()
    _wait_until_quiet(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in zip((1, 2), saved, strict=True):
        os.dup2(original, fd)
        os.close(original)
    _CONSOLE = previous


def _wait_until_quiet(path: str, quiet_s: float = 0.5, limit_s: float = 3.0) -> None:
    """Ray forwards the workers' last lines a moment after the job returns; wait (briefly) until
    the log stops growing so they land in the log rather than on the console."""
    deadline = time.monotonic() + limit_s
    size = os.path.getsize(path)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        grown = os.path.getsize(path)
        if grown == size:
            return
        size = grown


class Events:
    """A queue from workers to the driver: (kind, payload) tuples, sent without waiting."""

    def __init__(self):
        # Zero CPUs: the queue actor only relays small messages, and must never take the CPU a
        # training worker or a read task is waiting for.
        self.queue = Queue(actor_options={"num_cpus": 0})

    def send(self, kind: str, payload) -> None:
        with contextlib.suppress(Exception):  # progress is best effort, never a failure
            self.queue.put_nowait((kind, payload))

    def drain(self, timeout_s: float) -> list[tuple]:
        try:
            first = self.queue.get(timeout=timeout_s)
        except Exception:  # ray.util.queue.Empty, or the actor gone at shutdown
            return []
        rest = self.queue.get_nowait_batch(self.queue.qsize()) if self.queue.qsize() else []
        return [first, *rest]

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.queue.shutdown()


class EventPump:
    """A driver thread that hands every event to `handle(kind, payload)` while a job runs."""

    def __init__(self, events: Events, handle: Callable[[str, object], None]):
        self.events, self.handle = events, handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="brainray-events", daemon=True)

    def __enter__(self) -> EventPump:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for kind, payload in self.events.drain(timeout_s=0.5):  # what arrived at the end
            self.handle(kind, payload)
        console().close_bar()

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, payload in self.events.drain(timeout_s=POLL_S):
                try:
                    self.handle(kind, payload)
                except Exception as exc:  # a broken renderer must not stop the job
                    say(f"warning: cannot show progress: {exc}")
