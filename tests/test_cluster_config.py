"""Tests for cluster.yaml: Ray's launcher accepts it, and it agrees with pyproject.toml.

Validation runs the steps `ray up` runs before it talks to AWS (`_bootstrap_config` in
ray/autoscaler/_private/commands.py): `prepare_config` (merge with the AWS defaults.yaml, merge
setup commands, check the docker section, fill per-type worker limits), then `validate_config`
(ray-schema.json plus Ray's cross-field checks). Resource autodetection and the AWS bootstrap
(IAM, subnets, key pairs) need AWS and are left out: no network, no credentials.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
PYPROJECT = ROOT / "pyproject.toml"

IMAGE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<py_minor>\d+)"
                       r"-(?P<platform>cpu|gpu|cu\d+)$")
PROJECT_PYTHON = "3.11"


def launcher_validate(config: dict) -> dict:
    """What `ray up` does to the loaded YAML before contacting AWS; raises on an invalid config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def cluster(cluster_text) -> dict:
    return yaml.safe_load(cluster_text)


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


@pytest.fixture(scope="module")
def project_requirements(project) -> dict[str, Requirement]:
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {requirement.name: requirement for requirement in requirements}


def _pinned_version(requirement: Requirement) -> str:
    (spec,) = requirement.specifier  # exactly one specifier ...
    assert spec.operator == "==", f"{requirement} is not an exact pin"  # ... and it is a pin
    return spec.version


def _worker_types(config: dict) -> dict[str, dict]:
    return {name: node_type for name, node_type in config["available_node_types"].items()
            if name != config["head_node_type"]}


def _images(config: dict) -> dict[str, str]:
    """Every image a node can run: top-level docker images and per-node-type overrides."""
    docker = config["docker"]
    images = {key: docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    for name, node_type in config["available_node_types"].items():
        if "worker_image" in node_type.get("docker", {}):
            images[f"{name}.worker_image"] = node_type["docker"]["worker_image"]
    return images


def _pip_installed(commands: list[str]) -> list[Requirement]:
    requirements = []
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            requirements += [Requirement(word) for word in words[2:] if not word.startswith("-")]
    return requirements


def test_ray_launcher_accepts_the_config(cluster):
    # given cluster.yaml as loaded by `ray up`
    # when Ray prepares and validates it as the launcher does
    prepared = launcher_validate(cluster)

    # then it is valid; the head never counts as a worker and every node runs exactly the shared
    # setup commands (the AWS defaults' own head command, a boto3 install, was replaced)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0
    assert prepared["head_setup_commands"] == cluster["setup_commands"]
    assert prepared["worker_setup_commands"] == cluster["setup_commands"]
    assert prepared["provider"]["type"] == "aws"


def test_validating_the_raw_yaml_alone_is_not_what_the_launcher_does(cluster):
    # given the YAML as loaded, not yet merged with Ray's AWS defaults
    # when it is validated directly
    # then Ray refuses it for a field only the defaults provide: prepare_config must come first
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(copy.deepcopy(cluster))


def _set(path: tuple, value):
    def mutate(config: dict) -> None:
        *parents, key = path
        target = config
        for parent in parents:
            target = target[parent]
        target[key] = value
    return mutate


def _drop_head_type(config: dict) -> None:
    config["head_node_type"] = "no_such_type"


BROKEN = {
    "misspelled top-level key": (_set(("max_worker",), 10), jsonschema.ValidationError,
                                 "max_worker"),
    "max_workers not a number": (_set(("max_workers",), "lots"), jsonschema.ValidationError,
                                 "lots"),
    "misspelled node type key": (_set(("available_node_types", "gpu_worker", "min_worker"), 0),
                                 jsonschema.ValidationError, "min_worker"),
    "misspelled docker key": (_set(("docker", "worker_imgae"), "rayproject/ray:2.58.0-py311-cpu"),
                              jsonschema.ValidationError, "worker_imgae"),
    "fractional GPU resource": (_set(("available_node_types", "gpu_worker", "resources", "GPU"),
                                     0.5), jsonschema.ValidationError, "0.5"),
    "head type not defined": (_drop_head_type, ValueError, "head_node_type"),
    "min workers above the cap": (_set(("available_node_types", "cpu_worker", "min_workers"), 11),
                                  ValueError, "max_workers"),
}


@pytest.mark.parametrize("mutate,error,named", BROKEN.values(), ids=BROKEN.keys())
def test_ray_launcher_rejects_a_broken_copy(cluster, mutate, error, named):
    # given a copy of cluster.yaml with one typical mistake
    broken = copy.deepcopy(cluster)
    mutate(broken)

    # when Ray validates it as the launcher does
    # then it is refused, naming the offending key or value
    with pytest.raises(error) as refused:
        launcher_validate(broken)
    assert named in str(refused.value)


def test_images_pin_the_projects_ray_and_python(cluster, project, project_requirements):
    # given the Ray pin and Python range of pyproject.toml
    ray_version = _pinned_version(project_requirements["ray"])
    assert PROJECT_PYTHON in SpecifierSet(project["requires-python"])

    # when every image a node can run is read
    images = _images(cluster)

    # then each is a rayproject/ray tag of that exact Ray release on that Python
    assert {"head_image", "worker_image", "gpu_worker.worker_image"} <= set(images)
    for where, image in images.items():
        tag = IMAGE_TAG.match(image)
        assert tag, f"{where}: {image!r} is not a pinned rayproject/ray tag"
        assert tag["ray"] == ray_version, f"{where}: {image} is not Ray {ray_version}"
        assert f"{tag['py']}.{tag['py_minor']}" == PROJECT_PYTHON, f"{where}: {image}"


def test_setup_commands_install_exactly_pyprojects_dependencies(cluster, project_requirements):
    # given the dependencies of pyproject.toml
    # when the requirements pip-installs on every node are read
    installed = _pip_installed(cluster["setup_commands"])

    # then they are the same list, with the same pins: torch and torchvision above all
    by_name = {requirement.name: requirement for requirement in installed}
    for exact in ("torch", "torchvision"):
        assert by_name[exact].specifier == project_requirements[exact].specifier
        assert _pinned_version(by_name[exact])
    assert sorted(map(str, installed)) == sorted(map(str, project_requirements.values()))


def test_setup_stops_a_node_whose_image_drifted_from_the_pins(cluster, project_requirements):
    # given the Ray pin of pyproject.toml
    ray_version = _pinned_version(project_requirements["ray"])

    # when the first setup command (run before pip) is read
    guard = cluster["setup_commands"][0]

    # then it asserts the running image's Ray version and Python are the project's
    assert guard.startswith("python -c ")
    assert f'ray.__version__ == "{ray_version}"' in guard
    major, minor = PROJECT_PYTHON.split(".")
    assert f"sys.version_info[:2] == ({major}, {minor})" in guard


@pytest.mark.parametrize("pattern", [
    r"(AKIA|ASIA)[0-9A-Z]{16}",  # access key ids (long-term, temporary)
    r"aws_access_key_id",
    r"aws_secret_access_key",
    r"AWS_SECRET",
    r"aws_session_token",
    r"aws_credentials",  # Ray's provider option for passing keys in the config
    r"ssh_private_key",  # a path to a private key on one user's machine
])
def test_no_credentials_in_the_file(cluster_text, pattern):
    # given the raw text of cluster.yaml, comments included
    # when it is searched for a credential or secret
    # then there is none: nodes use instance profiles, `ray up` the local AWS credential chain
    assert not re.search(pattern, cluster_text, flags=re.IGNORECASE)


def test_every_node_type_has_an_instance_profile(cluster):
    # given every node type, head and workers
    node_types = cluster["available_node_types"]
    assert _worker_types(cluster), "no worker node types"

    # when their EC2 launch settings are read
    profiles = {name: node_type["node_config"].get("IamInstanceProfile", {})
                for name, node_type in node_types.items()}

    # then each names its own instance profile (Ray attaches its default one to the head only,
    # so a worker without one could not reach S3)
    for name, profile in profiles.items():
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IamInstanceProfile"


def test_a_gpu_worker_type_scales_from_zero_with_gpu_access(cluster):
    # given the worker node types
    workers = _worker_types(cluster)

    # when those advertising a GPU are picked out
    gpu_types = {name: node_type for name, node_type in workers.items()
                 if node_type["resources"].get("GPU", 0) >= 1}

    # then there is one; it starts at zero nodes, may grow, and its container sees the GPU
    assert gpu_types, "no worker node type has a GPU"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        docker = {**cluster["docker"], **node_type.get("docker", {})}  # Ray's per-type merge
        assert IMAGE_TAG.match(docker["worker_image"])["platform"] != "cpu", name
        assert "--gpus all" in docker.get("run_options", []) + docker.get("worker_run_options", [])


def test_the_head_has_no_gpu(cluster):
    # given the head node type
    head = cluster["available_node_types"][cluster["head_node_type"]]

    # when its advertised resources are read
    # then it offers CPUs for drivers and Ray Data but no GPU, so GPU training workers go elsewhere
    assert head["resources"].get("CPU", 0) >= 1
    assert head["resources"].get("GPU", 0) == 0


def test_start_commands_run_the_autoscaler_and_the_job_api(cluster):
    # given the start commands (docker-exec'ed on each node after setup)
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])

    # when they are read
    # then the head starts the autoscaler (else no worker is ever launched) and serves the
    # dashboard/job API for `ray job submit`, and workers join the head
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_every_node_type_pins_one_ami(cluster):
    # given every node type's EC2 launch settings
    image_ids = {name: node_type["node_config"].get("ImageId", "")
                 for name, node_type in cluster["available_node_types"].items()}

    # when their AMIs are read
    # then each names one explicitly, the same for all: without it Ray falls back to a CUDA 11.2
    # Deep Learning AMI whose driver cannot run torch's CUDA 13 build
    for name, image_id in image_ids.items():
        assert re.fullmatch(r"ami-[0-9a-f]{8}([0-9a-f]{9})?", image_id), f"{name}: {image_id!r}"
    assert len(set(image_ids.values())) == 1
