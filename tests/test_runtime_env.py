from __future__ import annotations

import subprocess
import sys

import pytest

from brainray import runtime_env


def test_worker_env_vars_set_the_allocator_tunables(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = runtime_env.worker_env_vars()
    assert env == {"GLIBC_TUNABLES": runtime_env.GLIBC_TUNABLES}
    assert "glibc.malloc.arena_max=1" in env["GLIBC_TUNABLES"]


def test_worker_env_vars_leave_a_users_own_tunables_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert runtime_env.worker_env_vars() == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_this_process_applies_on_glibc():
    # A child process: mallopt changes are process-wide and must not leak into the test session.
    code = "from brainray.runtime_env import tune_this_process; print(tune_this_process())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"
