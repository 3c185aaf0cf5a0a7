"""What the Ray cluster has and can have: whether a job uses GPUs, and whether its work may run
on another node than the driver's.

Deciding from the nodes alive at submit time is wrong on an autoscaling cluster: one that starts
with only its head has no GPU and one node when the job is submitted, and gets GPU workers only
once a job asks for them. So the decision also looks at what the autoscaler may launch: the node
types and their maximum counts, which Ray keeps in the GCS (autoscaler v2), or which a
cluster.yaml declares (`view_of_cluster_yaml`, for tests and for checking a config).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray._private.state import state  # what Ray Train reads too (its worker group's limits)


@dataclass(frozen=True)
class ClusterView:
    alive_nodes: int
    alive: dict[str, float]  # total resources of the alive nodes
    # the most of each resource the cluster can have once the autoscaler has launched every
    # worker it may (None: no autoscaler config known, the cluster is what is alive)
    possible: dict[str, float] | None = None
    can_add_nodes: bool = False  # an autoscaler may launch more worker nodes

    def gpus_possible(self) -> float:
        return max(self.alive.get("GPU", 0.0), (self.possible or {}).get("GPU", 0.0))


def use_gpu(requested: bool | None, view: ClusterView) -> bool:
    """--use-gpu / --no-gpu as given; otherwise GPUs when the cluster has or can have them."""
    return requested if requested is not None else view.gpus_possible() > 0


def is_multi_node(view: ClusterView) -> bool:
    """True when work may be placed on a node other than the driver's: more nodes alive now, or
    an autoscaler that may launch workers."""
    return view.alive_nodes > 1 or view.can_add_nodes


def describe(view: ClusterView, gpu: bool) -> str:
    alive_gpus = view.alive.get("GPU", 0.0)
    if not gpu:
        return "using CPUs only (no GPU in the cluster or its node types, or --no-gpu)"
    if alive_gpus:
        return f"using GPUs ({alive_gpus:g} alive)"
    return (f"using GPUs: none alive yet, the autoscaler can launch up to "
            f"{view.gpus_possible():g}; the job waits for them")


def current_view() -> ClusterView:
    """The view of the cluster this process is connected to."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    alive: dict[str, float] = {}
    for node in nodes:
        for key, value in node.get("Resources", {}).items():
            alive[key] = alive.get(key, 0.0) + float(value)
    possible = _autoscaler_limits()
    return ClusterView(alive_nodes=len(nodes), alive=alive, possible=possible,
                       can_add_nodes=_more_than_alive(possible, alive))


def _more_than_alive(possible: dict[str, float] | None, alive: dict[str, float]) -> bool:
    return any(value > alive.get(key, 0.0) for key, value in (possible or {}).items())


def _autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the autoscaler's node types allow, from its cluster config in
    the GCS; None where there is none (a fixed cluster, `ray start`, a local Ray)."""
    try:
        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # a GCS without the autoscaler's entry
        return None
    return {key: float(value) for key, value in limits.items()} if limits else None


def view_of_cluster_yaml(config: dict, alive_nodes: int = 1,
                         alive: dict[str, float] | None = None) -> ClusterView:
    """The view an autoscaling cluster launched from this cluster.yaml has at submit time: only
    the head alive (or what is given), and node types up to their max_workers (capped by the
    file's max_workers)."""
    types = config["available_node_types"]
    head = config["head_node_type"]
    cap = config.get("max_workers")
    possible = dict(types[head].get("resources", {}))
    workers = 0
    for name, node_type in types.items():
        if name == head:
            continue
        count = node_type.get("max_workers", 0)
        count = min(count, cap) if cap is not None else count
        workers += count
        for key, value in node_type.get("resources", {}).items():
            possible[key] = possible.get(key, 0.0) + float(value) * count
    head_alive = {k: float(v) for k, v in types[head].get("resources", {}).items()}
    alive = alive if alive is not None else head_alive
    return ClusterView(alive_nodes=alive_nodes, alive=alive, possible=possible,
                       can_add_nodes=workers > 0 and _more_than_alive(possible, alive))
