"""One scoring run at a time per output: a lease object that a run creates before it does
anything, renews while it works and deletes at the end.

The lease is created only if it does not exist (S3's If-None-Match, a link locally) and renewed
or taken over only if it is unchanged since it was read (If-Match), so two runs started at the
same moment cannot both hold it. A run that dies stops renewing it; once it has expired, the
next run takes it over and recovers what the dead run left (brainray.publish.recover). While a
live run holds it, another run refuses to start with a message that says who holds it and until
when.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
from dataclasses import dataclass

from brainray import storage
from brainray.config import StorageOptions

LEASE = "_lease.json"
DEFAULT_TTL_S = 300.0


class LeaseHeld(RuntimeError):
    """A live run holds the output."""


class LeaseLost(RuntimeError):
    """Another run took the lease over (this run was presumed dead): it must not commit."""


@dataclass
class Lease:
    uri: str
    run_id: str
    version: str
    ttl_s: float

    def _record(self) -> bytes:
        now = dt.datetime.now(dt.UTC)
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed_at": now.isoformat(),
                           "expires_at": (now + dt.timedelta(seconds=self.ttl_s)).isoformat()},
                          indent=2).encode()


def _expired(record: bytes) -> bool:
    """Past its expiry, or held by a process of this machine that is gone (a run killed on the
    same host frees the output at once instead of after its TTL)."""
    try:
        holder = json.loads(record)
        expires = dt.datetime.fromisoformat(holder["expires_at"])
    except (ValueError, KeyError, TypeError):
        return True  # unreadable: a writer died mid-write (only possible without conditions)
    if expires < dt.datetime.now(dt.UTC):
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return pid > 0


def acquire(output: str, run_id: str, options: StorageOptions,
            ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """The output's lease for this run; LeaseHeld when a live run has it."""
    lease = Lease(storage.join(output, LEASE), run_id, "", ttl_s)
    current = storage.read_versioned(lease.uri, options)
    if current is not None and not _expired(current[0]):
        holder = json.loads(current[0])
        raise LeaseHeld(
            f"another brainray score run ({holder['run_id']}, host {holder['host']} pid "
            f"{holder['pid']}) is writing to {storage.redact(output)} until "
            f"{holder['expires_at']} unless it renews; run again after it has finished (or "
            "once its lease has expired, if it died)")
    try:
        lease.version = storage.write_versioned(lease.uri, lease._record(),
                                                None if current is None else current[1], options)
    except storage.PreconditionFailed as exc:
        raise LeaseHeld(f"another brainray score run took {storage.redact(output)} just now; "
                        "run again after it has finished") from exc
    return lease


def renew(lease: Lease, options: StorageOptions) -> None:
    try:
        lease.version = storage.write_versioned(lease.uri, lease._record(), lease.version,
                                                options)
    except storage.PreconditionFailed as exc:
        raise LeaseLost(f"run {lease.run_id} lost its lease on the output (it was taken over "
                        "after it expired); nothing of this run is committed") from exc


def release(lease: Lease, options: StorageOptions) -> None:
    """Give the output up (only if the lease is still ours)."""
    current = storage.read_versioned(lease.uri, options)
    if current is not None and current[1] == lease.version:
        storage.delete(lease.uri, options)


class Held:
    """Holds a lease for the length of a `with` block, renewing it every third of its TTL;
    `check()` raises LeaseLost if a renewal failed (call it before committing)."""

    def __init__(self, output: str, run_id: str, options: StorageOptions,
                 ttl_s: float = DEFAULT_TTL_S):
        self.options = options
        self.lease = acquire(output, run_id, options, ttl_s)
        self._stop = threading.Event()
        self._lost: Exception | None = None
        self._thread = threading.Thread(target=self._renew, name="brainray-lease", daemon=True)

    def __enter__(self) -> Held:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost is None:
            release(self.lease, self.options)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                renew(self.lease, self.options)
            except LeaseLost as exc:
                self._lost = exc
                return
            except storage.StorageError:
                continue  # a blip: the next renewal comes well before the lease expires

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost
        renew(self.lease, self.options)  # and make sure the commit has a full TTL ahead
