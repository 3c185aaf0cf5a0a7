"""Tests for brainray.backbones: torchvision models on gray input, and checked initial weights.

No test downloads weights: each saves a randomly initialised torchvision model's state dict,
which is exactly the layout of torchvision's published files.
"""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch
import torchvision

from brainray import backbones
from brainray.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchvisionNet,
    WeightsError,
    check_fits,
    initial_weights,
    load_backbone,
)
from brainray.train_loop import make_optimizer


def _imagenet_state(name: str, seed: int = 0) -> dict:
    """What torchvision publishes: the architecture with its 1000-class head."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None).state_dict()


def _file_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_gray_input_is_repeated_to_three_channels_and_imagenet_normalised():
    # Given a resnet18 and a gray batch in [0, 1]
    torch.manual_seed(0)
    model = TorchvisionNet("resnet18", num_classes=4).eval()
    gray = torch.rand(2, 1, 32, 32)
    # When it classifies the gray batch and, by hand, the normalised three-channel copy
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model(gray)
        expected = model.net((gray.expand(-1, 3, -1, -1) - mean) / std)
    # Then both are the same logits, one per class
    assert ours.shape == (2, 4)
    torch.testing.assert_close(ours, expected)


def test_state_dict_holds_only_torchvisions_keys_under_net():
    model = TorchvisionNet("efficientnet_b0", num_classes=4)
    keys = set(model.state_dict())
    assert all(k.startswith("net.") for k in keys)
    assert {k.removeprefix("net.") for k in keys} == set(model.net.state_dict())


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_pretrained_backbone_is_loaded_and_the_new_head_is_not(name):
    # Given an ImageNet-layout state dict (1000-class head) and a 4-class model
    published = _imagenet_state(name, seed=1)
    torch.manual_seed(2)
    model = TorchvisionNet(name, num_classes=4)
    head = model.head_parameter_names()
    head_before = {k: v.clone() for k, v in model.named_parameters() if k in head}
    # When the backbone is loaded
    load_backbone(model, published, "test file")
    # Then every backbone tensor is the file's, and the head keeps its own initialisation
    state = model.net.state_dict()
    for key, value in published.items():
        if "net." + key not in head and key in state and state[key].shape == value.shape:
            torch.testing.assert_close(state[key], value)
    for key, value in model.named_parameters():
        if key in head:
            torch.testing.assert_close(value, head_before[key])
    assert head and all(k.startswith("net.fc.") or k.startswith("net.classifier.") for k in head)


def test_weights_of_another_architecture_are_refused_with_the_mismatch():
    with pytest.raises(WeightsError, match=r"does not fit resnet50: missing keys"):
        check_fits(TorchvisionNet("resnet50", 4), _imagenet_state("resnet18"), "r18.pth")


def test_a_shape_mismatch_is_refused_naming_the_key_and_shapes():
    state = _imagenet_state("resnet18")
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(WeightsError, match=r"shape mismatches: 1 \(e.g. conv1.weight\): "
                                           r"\(64, 1, 7, 7\) vs \(64, 3, 7, 7\)"):
        check_fits(TorchvisionNet("resnet18", 4), state, "f.pth")


def test_unexpected_keys_are_refused():
    state = {**_imagenet_state("resnet18"), "extra.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected keys: 1 \(e.g. extra.weight\)"):
        check_fits(TorchvisionNet("resnet18", 4), state, "f.pth")


def test_a_file_that_is_not_a_state_dict_is_refused():
    with pytest.raises(WeightsError, match="is not a state dict"):
        check_fits(TorchvisionNet("resnet18", 4), {"model": {"a": 1}}, "f.pth")


class _RunsShell:
    def __reduce__(self):
        return os.system, ("touch /tmp/brainray-weights-pwned",)


def test_a_pickled_weights_file_is_refused_and_its_code_never_runs(tmp_path):
    marker = "/tmp/brainray-weights-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    path.write_bytes(_file_bytes({"conv1.weight": _RunsShell()}))
    with pytest.raises(WeightsError, match="cannot be loaded safely"):
        initial_weights(str(path), "resnet18", lambda uri: open(uri, "rb").read())
    assert not os.path.exists(marker)


def test_initial_weights_from_a_file_record_its_source_and_sha256(tmp_path):
    data = _file_bytes(_imagenet_state("resnet18"))
    path = tmp_path / "r18.pth"
    path.write_bytes(data)
    state, provenance = initial_weights(str(path), "resnet18", lambda uri: open(uri, "rb").read())
    assert provenance == {"source": str(path), "sha256": hashlib.sha256(data).hexdigest()}
    assert set(state) == set(_imagenet_state("resnet18"))


def test_imagenet_weights_are_read_from_a_pre_staged_torch_home(tmp_path, monkeypatch):
    # Given torchvision's file for resnet18 pre-staged in $TORCH_HOME (an offline cluster)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    staged = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    staged.parent.mkdir(parents=True)
    data = _file_bytes(_imagenet_state("resnet18"))
    staged.write_bytes(data)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("must not download a cached file"))
    # When --weights imagenet is resolved
    _, provenance = initial_weights("imagenet", "resnet18", None)
    # Then the cached file is used, and its provenance names torchvision's weights
    assert provenance["sha256"] == hashlib.sha256(data).hexdigest()
    assert "ResNet18_Weights.IMAGENET1K_V1" in provenance["source"]


def test_imagenet_weights_missing_offline_say_how_to_pre_stage_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"could not be downloaded.*pre-stage the file"):
        initial_weights("imagenet", "resnet18", None)


def test_weights_for_a_brainray_model_are_refused():
    with pytest.raises(WeightsError, match="needs a torchvision model"):
        initial_weights("imagenet", "bn_cnn", None)


def test_fine_tuning_gives_the_backbone_a_lower_learning_rate_than_the_head():
    model = TorchvisionNet("resnet18", 4)
    optimizer = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"), backbone_lr_factor=0.1)
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(1e-3)
    head_names = model.head_parameter_names()
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[id(p)] for p in head["params"]} == head_names
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))


def test_grad_cam_layer_is_the_last_stage():
    assert TorchvisionNet("resnet18", 4).cam_layer is not None
    model = TorchvisionNet("convnext_tiny", 4)
    assert model.cam_layer is model.net.features


def test_backbones_module_lists_exactly_the_configs_torchvision_models():
    from brainray.config import TORCHVISION_MODELS

    assert set(backbones._HEAD_PREFIX) == set(TORCHVISION_MODELS) == set(backbones._CAM_LAYER)
