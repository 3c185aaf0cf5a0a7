"""Tests for brainray.lease: one run per output, locally and on S3 (conditional writes)."""

from __future__ import annotations

import json
import threading

import pytest

from brainray import lease, storage
from brainray.config import StorageOptions


def test_a_second_run_is_refused_while_the_first_holds_the_lease(local_and_s3_output):
    uri, options = local_and_s3_output
    held = lease.acquire(uri, "run-1", options)
    with pytest.raises(lease.LeaseHeld, match=r"another brainray score run \(run-1, host .*"
                                              r"run again after it has finished"):
        lease.acquire(uri, "run-2", options)
    lease.release(held, options)
    lease.release(lease.acquire(uri, "run-2", options), options)  # free again


def test_two_runs_starting_together_get_one_lease(local_and_s3_output):
    uri, options = local_and_s3_output
    results: dict[str, object] = {}

    def start(run_id: str) -> None:
        try:
            results[run_id] = lease.acquire(uri, run_id, options)
        except lease.LeaseHeld as exc:
            results[run_id] = exc

    threads = [threading.Thread(target=start, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results.values() if isinstance(r, lease.Lease)]
    assert len(winners) == 1 and len(results) == 4


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew(local_and_s3_output):
    uri, options = local_and_s3_output
    # Given a run that died: its lease expired without being renewed
    dead = lease.acquire(uri, "run-dead", options, ttl_s=-1.0)
    # When the next run starts, Then it takes the lease over
    alive = lease.acquire(uri, "run-next", options)
    record = json.loads(storage.read_versioned(alive.uri, options)[0])
    assert record["run_id"] == "run-next"
    # and the old holder, were it still running, can neither renew nor release it
    with pytest.raises(lease.LeaseLost, match="nothing of this run is committed"):
        lease.renew(dead, options)
    lease.release(dead, options)
    assert storage.read_versioned(alive.uri, options) is not None


def test_held_renews_and_releases(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    with lease.Held(uri, "run-1", options, ttl_s=0.3) as held:
        before = held.lease.version
        threading.Event().wait(0.5)  # two renewals due (every TTL / 3)
        held.check()
        assert held.lease.version != before
    assert storage.read_versioned(storage.join(uri, lease.LEASE), options) is None


def test_held_check_fails_once_another_run_took_over(tmp_path):
    uri, options = str(tmp_path / "out"), StorageOptions()
    held = lease.Held(uri, "run-1", options, ttl_s=300.0)
    other = lease.Lease(held.lease.uri, "run-2", "", 300.0)
    storage.write_versioned(other.uri, other._record(), held.lease.version, options)
    with pytest.raises(lease.LeaseLost):
        held.check()


def test_the_lease_of_a_killed_process_on_this_host_is_free_at_once(tmp_path):
    import subprocess
    import sys

    uri, options = str(tmp_path / "out"), StorageOptions()
    # Given a process that took the lease and was then killed (SIGKILL: it released nothing)
    code = ("import os, signal; from brainray import lease; from brainray.config import "
            f"StorageOptions; lease.acquire({uri!r}, 'run-killed', StorageOptions()); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    # When the next run starts, long before the TTL, Then it gets the lease
    assert lease.acquire(uri, "run-next", options).run_id == "run-next"
