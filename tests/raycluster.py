"""A private multi-node Ray cluster on this machine, for tests: a head and worker nodes, each its
own `ray start` (its own raylet, object store and workers), on loopback and free ports.

It coexists with the session cluster of `conftest.ray_cluster` and with any other Ray on the
machine: its own temp dir and ports, and it is stopped by killing exactly the processes it
started, never with `ray stop` (which kills every Ray process on the machine). A worker node is
killed as a whole (SIGKILL to its `ray start` session and every process it started): that is a
node failure, as when a machine dies.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET

REPO_ROOT = Path(__file__).resolve().parents[1]
# The venv's bin folder, not resolved: resolving would follow `python` to the base interpreter.
VENV_BIN = Path(sys.executable).parent
FAKE_AWS = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
# Generous: on a busy 2-core machine the head alone has taken two minutes to start
START_TIMEOUT_S = 480


def psutil():
    """Ray vendors psutil (ray/thirdparty_files) and puts it on sys.path when imported."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def free_ports(n: int) -> list[int]:
    """n distinct ports, free on every interface, below the kernel's ephemeral range.

    Ray binds on all interfaces, and the other Ray instances on this machine keep starting
    workers on kernel-assigned ephemeral ports (32768+): a port taken from there could be grabbed
    by one of them between this check and our node binding it. Below that range only explicit
    binds compete, and Ray's fixed defaults (6379, 8265, 10001, 52365...) are not in 20000-32000.
    """
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def _node_ports() -> list[str]:
    (node_manager, object_manager, metrics, agent_http, agent_grpc,
     runtime_env_agent) = free_ports(6)
    return ["--node-manager-port", str(node_manager), "--object-manager-port",
            str(object_manager), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port",
            str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent)]


@dataclass
class RayNodes:
    temp_dir: str
    env: dict
    gcs_address: str = ""
    dashboard_url: str = ""
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        # Each node gets its own fresh temp dir, as each machine of a real cluster has its own
        # disk: nodes sharing one would share their session dir, where one node's runtime-env
        # agent re-unpacks the job's working dir under the others' running workers (whose
        # os.getcwd() then fails with ENOENT).
        node_dir = (self.temp_dir if name == "head"
                    else tempfile.mkdtemp(prefix=f"{name}-", dir=self.temp_dir))
        command = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                   *args, *_node_ports(), "--temp-dir", node_dir, "--disable-usage-stats",
                   "--log-style", "record", "--log-color", "false"]
        log = open(Path(self.temp_dir) / f"ray-start-{name}.log", "ab")  # noqa: SIM115
        with log:
            process = subprocess.Popen(command, env=self.env, cwd=self.temp_dir, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.nodes[name] = process
        return process

    def start_head(self, num_cpus: int = 0) -> None:
        """The head: GCS, dashboard and job server; no CPUs by default, so every task, worker
        and actor runs on a worker node while job drivers stay on the head."""
        gcs, dashboard, client_server = free_ports(3)
        self._start("head", [
            "--head", "--port", str(gcs), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(client_server), "--num-cpus", str(num_cpus),
            "--num-gpus", "0", "--object-store-memory", "200000000"])
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._wait_for_job_server()

    def add_node(self, name: str, num_cpus: int = 2) -> None:
        """A worker node with a custom resource named after it (to place work on it)."""
        self.add_nodes(name, num_cpus=num_cpus)

    def add_nodes(self, *names: str, num_cpus: int = 2) -> None:
        """Worker nodes started together (each joins in its own time), then awaited in turn.

        `ray start` gives up when its raylet has not registered with the GCS within 30 s (a
        constant in Ray's node.py), which a loaded 2-core machine can exceed: the failed
        attempt's processes are killed and that node is started once more.
        """
        started = {name: self._start_worker(name, num_cpus) for name in names}
        for name, process in started.items():
            for attempt in (1, 2):
                try:
                    self._wait_for(lambda n=name: n in self.alive_node_resources(),
                                   f"node {name} to join", log=name, process=process)
                    break
                except TimeoutError:
                    if attempt == 2 or process.poll() is None:
                        raise
                    self.kill_node(name)
                    process = self._start_worker(name, num_cpus)

    def _start_worker(self, name: str, num_cpus: int) -> subprocess.Popen:
        return self._start(name, [
            "--address", self.gcs_address, "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", "150000000", "--resources", json.dumps({name: 1})])

    def kill_node(self, name: str) -> None:
        """SIGKILL a worker node: its `ray start` session and every process it started."""
        process = self.nodes.pop(name)
        tree = _tree(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(Exception):
                child.kill()
        process.wait(timeout=30)

    def alive_node_resources(self) -> dict[str, str]:
        """custom node name -> node id, of the alive nodes (from the GCS, via the dashboard)."""
        from ray.util.state import list_nodes

        found = {}
        for node in list_nodes(address=self.dashboard_url, detail=True,
                               raise_on_missing_output=False):
            if node.state == "ALIVE":
                for key in node.resources_total:
                    if key.startswith("node_"):
                        found[key] = node.node_id
        return found

    def actor_nodes(self, class_fragment: str, state: str | None = None) -> list[str]:
        """Node ids of the actors whose class name contains `class_fragment`."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, detail=True, limit=10_000,
                             raise_on_missing_output=False)
        return [a.node_id for a in actors if class_fragment in (a.class_name or "")
                and (state is None or a.state == state)]

    def _wait_for(self, ready, what: str, timeout_s: float = START_TIMEOUT_S,
                  log: str = "head", process: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        process = process or self.nodes.get("head")
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if ready():
                    return
            if process is not None and process.poll() is not None:  # `ray start` gave up
                break
            time.sleep(1)
        raise TimeoutError(f"gave up waiting for {what}; its `ray start` log:\n"
                           f"{tail(Path(self.temp_dir) / f'ray-start-{log}.log')}")

    def _wait_for_job_server(self) -> None:
        from ray.job_submission import JobSubmissionClient

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as r:
                json.loads(r.read())
            JobSubmissionClient(self.dashboard_url).list_jobs()
            return True

        self._wait_for(ready, f"the job server at {self.dashboard_url}")

    def stop(self) -> list[str]:
        """Kill everything this cluster started, and only that; returns what outlived it."""
        trees = {name: _tree(p.pid) for name, p in self.nodes.items()}
        for name, process in self.nodes.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM if name == "head" else signal.SIGKILL)
        everything = [p for tree in trees.values() for p in tree]
        _, alive = psutil().wait_procs(everything, timeout=10)
        for process in alive:
            with contextlib.suppress(Exception):
                process.kill()
        psutil().wait_procs(alive, timeout=10)
        leftovers = []
        for process in psutil().process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if self.temp_dir in cmdline:
                leftovers.append(f"{process.info['pid']}: {cmdline[:200]}")
        return leftovers


def _tree(pid: int) -> list:
    try:
        root = psutil().Process(pid)
        return [root, *root.children(recursive=True)]
    except Exception:
        return []


@contextlib.contextmanager
def ray_nodes():
    """A started head; the caller adds worker nodes. Everything is killed at the end."""
    # A short temp dir: Ray puts unix sockets under it and their paths are limited to ~107 chars.
    temp_dir = tempfile.mkdtemp(prefix="br", dir="/tmp")
    # Jobs inherit the head's environment: the venv's bin first on PATH (its `python` has
    # brainray's dependencies), fake AWS credentials for moto; RAY_ADDRESS would point elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FAKE_AWS, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               # a busy 2-core machine can exceed Ray's dashboard start-up limits
               RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="120",
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="150")
    cluster = RayNodes(temp_dir=temp_dir, env=env)
    try:
        cluster.start_head()
        yield cluster
    finally:
        leftovers = cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster outlived it: {leftovers}"


__all__ = ["FAKE_AWS", "FAKE_SECRET", "REPO_ROOT", "VENV_BIN", "RayNodes", "ray_nodes", "tail"]
