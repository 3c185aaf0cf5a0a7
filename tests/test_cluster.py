"""Tests for brainray.cluster: GPU and multi-node decisions from what a cluster has and can have,
against the parsed cluster.yaml and against a real local cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainray import cluster
from brainray.cluster import ClusterView

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def at_submit_time() -> ClusterView:
    """cluster.yaml's cluster right after `ray up`: the head alone, workers scale from zero."""
    return cluster.view_of_cluster_yaml(yaml.safe_load(CLUSTER_YAML.read_text()))


def test_an_autoscaling_cluster_with_only_its_head_alive_trains_on_gpus(at_submit_time):
    # Given the cluster.yaml cluster at submit time: one CPU node, no GPU alive
    assert at_submit_time.alive_nodes == 1 and at_submit_time.alive.get("GPU", 0) == 0
    # Then auto-detection still picks the GPUs its node types can bring
    assert at_submit_time.gpus_possible() == 4
    assert cluster.use_gpu(None, at_submit_time) is True
    assert "none alive yet" in cluster.describe(at_submit_time, True)


def test_an_autoscaling_cluster_counts_as_multi_node_before_its_workers_exist(at_submit_time):
    assert cluster.is_multi_node(at_submit_time) is True


def test_explicit_gpu_flags_win_over_detection(at_submit_time):
    assert cluster.use_gpu(False, at_submit_time) is False
    cpu_only = ClusterView(alive_nodes=1, alive={"CPU": 2.0})
    assert cluster.use_gpu(True, cpu_only) is True
    assert cluster.use_gpu(None, cpu_only) is False


def test_a_cluster_yaml_without_gpu_node_types_trains_on_cpus():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    del config["available_node_types"]["gpu_worker"]
    view = cluster.view_of_cluster_yaml(config)
    assert cluster.use_gpu(None, view) is False and cluster.is_multi_node(view) is True


def test_a_head_only_cluster_yaml_is_one_node():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            node_type["max_workers"] = 0
    assert cluster.is_multi_node(cluster.view_of_cluster_yaml(config)) is False


@pytest.mark.ray
def test_the_local_test_cluster_is_one_node_without_gpus(ray_cluster):
    # Given the suite's real local Ray (4 logical CPUs, no GPU, no autoscaler)
    view = cluster.current_view()
    # Then it is what is alive: one node, CPUs only, nothing to add
    assert view.alive_nodes == 1 and view.alive["CPU"] == 4.0
    assert view.possible is None and view.can_add_nodes is False
    assert cluster.use_gpu(None, view) is False and cluster.is_multi_node(view) is False
