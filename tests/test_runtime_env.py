from __future__ import annotations

import subprocess
import sys

import pytest

from brainray import runtime_env


def _clear(monkeypatch):
    for name in (*runtime_env.ALLOCATOR_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


def test_worker_env_vars_set_the_allocator(monkeypatch):
    _clear(monkeypatch)
    env = runtime_env.worker_env_vars()
    assert env["MALLOC_ARENA_MAX"] == "1"
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 2**30
    # Ray's runtime_env truncates values at ":", so none may contain one
    assert all(":" not in value for value in env.values())


@pytest.mark.parametrize("name", ["GLIBC_TUNABLES", "MALLOC_ARENA_MAX"])
def test_worker_env_vars_leave_a_users_own_settings_alone(monkeypatch, name):
    _clear(monkeypatch)
    monkeypatch.setenv(name, "4")
    assert runtime_env.worker_env_vars() == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_this_process_applies_on_glibc():
    # A child process: mallopt changes are process-wide and must not leak into the test session.
    code = "from brainray.runtime_env import tune_this_process; print(tune_this_process())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"
