"""Tests for brainray.model: architectures and safe, self-describing checkpoints."""

from __future__ import annotations

import io
import os

import pytest
import torch

from brainray.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    deserialize,
    make_checkpoint,
    model_from_checkpoint,
    preprocess_config,
    serialize,
    tta_of,
    weights_id,
    with_fields,
)
from brainray.config import DEFAULT_CLASSES, MODEL_NAMES, PreprocessConfig
from brainray.model import BasicBlock, build_model, count_parameters

CLASSES = list(DEFAULT_CLASSES)
SMALL = 64
CKPT_SIZE = 32  # checkpoint tests only need small, fast models


class _RunsShell:
    """Unpickling this calls os.system(command): the classic malicious-pickle payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _checkpoint(name="bn_cnn", image_size=CKPT_SIZE, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, len(CLASSES), image_size)
    if name == "bn_cnn":  # move BatchNorm running statistics away from their defaults
        model.train()
        with torch.no_grad():
            model(torch.rand(4, 3, image_size, image_size))
    checkpoint = make_checkpoint(
        model, model_name=name, classes=CLASSES,
        preprocess=PreprocessConfig(image_size=image_size),
        config={"lr": 0.001, "classes": CLASSES}, metrics={"val_accuracy": 0.5}, epoch=3)
    return model, checkpoint


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --- architectures --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("image_size", [224, SMALL])
def test_build_model_gives_logits_per_class(name, image_size):
    # Given each architecture at the default and a small image size
    model = build_model(name, num_classes=4, image_size=image_size).eval()
    # When a batch of two images goes through it
    with torch.no_grad():
        logits = model(torch.rand(2, 3, image_size, image_size))
    # Then there is one finite logit per class per image
    assert logits.shape == (2, 4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model_works_channels_last(name):
    model = build_model(name, 3, SMALL).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, SMALL, SMALL).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (1, 3)


def test_paper_cnn_has_the_papers_parameter_count():
    # 3 convs (896 + 18,496 + 73,856) + dense 100,352->128 (12,845,184) + 128->4 (516)
    assert count_parameters(build_model("paper_cnn", 4, 224)) == 12_938_948


def test_bn_cnn_is_much_smaller_than_paper_cnn():
    assert count_parameters(build_model("bn_cnn", 4, 224)) < 2_000_000


def test_build_model_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 4)


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip_preserves_weights_and_outputs(name):
    # Given a model and its checkpoint
    model, checkpoint = _checkpoint(name)
    # When serialized, deserialized and rebuilt
    restored = deserialize(serialize(checkpoint), expected_classes=CLASSES)
    rebuilt = model_from_checkpoint(restored)
    # Then every tensor (weights and buffers) is bit-identical
    original = model.state_dict()
    assert set(restored["state_dict"]) == set(original)
    for key, value in original.items():
        assert torch.equal(restored["state_dict"][key], value), key
    # and the metadata survives
    assert restored["model_name"] == name and restored["classes"] == CLASSES
    assert restored["epoch"] == 3 and restored["metrics"] == {"val_accuracy": 0.5}
    assert preprocess_config(restored) == PreprocessConfig(image_size=CKPT_SIZE)
    # and the rebuilt model is in eval mode and gives the same outputs
    assert not rebuilt.training
    x = torch.rand(2, 3, CKPT_SIZE, CKPT_SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_checkpoint_detaches_from_the_live_model():
    # Given a checkpoint taken from a model / When the model keeps training
    model, checkpoint = _checkpoint("paper_cnn")
    key = next(iter(checkpoint["state_dict"]))
    before = checkpoint["state_dict"][key].clone()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    # Then the checkpoint still holds the weights at the time it was taken
    assert torch.equal(checkpoint["state_dict"][key], before)


def test_checkpoint_bytes_load_with_plain_torch_weights_only():
    _, checkpoint = _checkpoint()
    loaded = torch.load(io.BytesIO(serialize(checkpoint)), weights_only=True)
    assert loaded["format"] == CHECKPOINT_FORMAT
    assert loaded["model_id"] == checkpoint["model_id"]
    assert all(isinstance(v, torch.Tensor) for v in loaded["state_dict"].values())


def test_deserialize_refuses_pickled_code_without_running_it(tmp_path):
    # Given a file that runs a shell command when unpickled
    marker = tmp_path / "pwned"
    data = _torch_bytes(_RunsShell(f"echo pwned > {marker}"))
    # When deserialized / Then it is refused as unsafe, and the command never ran
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        deserialize(data, source="evil.pt")
    assert not marker.exists()


def test_deserialize_refuses_code_hidden_inside_a_valid_checkpoint(tmp_path):
    # Given a genuine checkpoint with a malicious object tucked into its metrics
    marker = tmp_path / "pwned"
    _, checkpoint = _checkpoint()
    checkpoint["metrics"] = {"note": _RunsShell(f"touch {marker}")}
    # When deserialized / Then it is refused and nothing ran
    with pytest.raises(CheckpointError):
        deserialize(_torch_bytes(checkpoint))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"state_dict": {"w": torch.zeros(2)}},
    {"format": "someone-elses-v3", "state_dict": {}},
    [1, 2, 3],
    torch.zeros(3),
], ids=["plain-dict", "other-format", "list", "tensor"])
def test_deserialize_refuses_non_brainray_objects(payload):
    with pytest.raises(CheckpointError, match="is not a brainray checkpoint"):
        deserialize(_torch_bytes(payload), source="other.pt")


@pytest.mark.parametrize("data", [b"not a checkpoint at all", b"PK\x03\x04garbage", b"\x80"],
                         ids=["text", "fake-zip", "one-byte"])
def test_deserialize_refuses_garbage_bytes(data):
    with pytest.raises(CheckpointError, match="garbage.pt cannot be loaded"):
        deserialize(data, source="garbage.pt")


def test_deserialize_refuses_empty_file():
    # Given a 0-byte checkpoint (e.g. an interrupted upload)
    # When deserialized / Then a CheckpointError names the file
    with pytest.raises(CheckpointError, match="empty.pt"):
        deserialize(b"", source="empty.pt")


def test_deserialize_refuses_unknown_model_name():
    _, checkpoint = _checkpoint()
    checkpoint["model_name"] = "resnet"
    with pytest.raises(CheckpointError, match="unknown model 'resnet'"):
        deserialize(serialize(checkpoint))


def test_deserialize_refuses_mismatched_classes():
    # Given a checkpoint trained on the four default classes
    _, checkpoint = _checkpoint()
    data = serialize(checkpoint)
    # When the caller expects a different list (or the same names in another order)
    for expected in (["glioma", "notumor"], list(reversed(CLASSES))):
        # Then it is refused, naming both lists
        with pytest.raises(CheckpointError, match="was trained on classes"):
            deserialize(data, source="m.pt", expected_classes=expected)
    assert deserialize(data, expected_classes=tuple(CLASSES))["classes"] == CLASSES


def test_deserialize_refuses_tampered_weights():
    # Given a checkpoint whose weights were changed after their hash was recorded
    _, checkpoint = _checkpoint()
    key = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1e-3
    # When deserialized / Then the mismatch is detected
    with pytest.raises(CheckpointError, match="do not match their recorded weights_id"):
        deserialize(serialize(checkpoint), source="tampered.pt")


@pytest.mark.parametrize("missing", ["model_name", "state_dict", "model_id"])
def test_deserialize_refuses_checkpoint_with_missing_fields(missing):
    _, checkpoint = _checkpoint()
    del checkpoint[missing]
    with pytest.raises(CheckpointError):
        deserialize(serialize(checkpoint), source="partial.pt")


def test_weights_id_is_stable_and_changes_with_any_weight():
    # Given a model's weights
    model, _ = _checkpoint("paper_cnn")
    first = weights_id(model.state_dict())
    # Then the id is a short hex string, the same on every call and for a copy
    assert first == weights_id(model.state_dict())
    assert first == weights_id({k: v.clone() for k, v in model.state_dict().items()})
    assert len(first) == 16 and int(first, 16) >= 0
    # When one element of one tensor changes / Then the id changes
    with torch.no_grad():
        model.classifier[-1].bias[0] += 1e-6
    assert weights_id(model.state_dict()) != first


def test_weights_id_distinguishes_models_with_different_seeds():
    _, a = _checkpoint("bn_cnn", seed=0)
    _, b = _checkpoint("bn_cnn", seed=1)
    assert a["model_id"] != b["model_id"]


def test_paper_cnn_pool_before_relu_computes_the_papers_conv_relu_pool():
    """The layer order is swapped for speed; outputs and gradients must be the paper's."""
    torch.manual_seed(0)
    model = build_model("paper_cnn", 4, image_size=32)
    paper_order = torch.nn.Sequential(*[
        layer for conv, pool, relu in zip(*[iter(model.features)] * 3, strict=True)
        for layer in (conv, relu, pool)])
    x = torch.rand(3, 3, 32, 32) - 0.3  # negative inputs exercise the ReLU
    ours = model.features(x)
    theirs = paper_order(x.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grads = [torch.autograd.grad(f(x).square().sum(), model.features[0].weight)[0]
             for f in (model.features, paper_order)]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gray_channel_computes_what_three_copies_of_it_compute(name):
    """The pipeline feeds one gray channel; outputs and every gradient must be those of the
    paper's gray-copied-to-RGB input, and the weights keep their RGB layout."""
    torch.manual_seed(0)
    model = build_model(name, 4, image_size=SMALL).train()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.shape[1] == 3
    gray = torch.rand(3, 1, SMALL, SMALL)
    outputs, grads = [], []
    for x in (gray, gray.repeat(1, 3, 1, 1)):
        torch.manual_seed(1)  # the same dropout mask for both
        logits = model(x)
        outputs.append(logits)
        grads.append(torch.autograd.grad(logits.square().sum(), list(model.parameters())))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_gray_input_keeps_a_channels_last_model_channels_last():
    # Given a channels-last model and a gray batch laid out NCHW (what grid_sample returns)
    model = build_model("paper_cnn", 4, image_size=SMALL).to(memory_format=torch.channels_last)
    x = torch.rand(2, 1, SMALL, SMALL)
    assert x.stride(1) != 1
    # When the first convolution runs / Then its output is channels-last, so every later layer
    # runs the channels-last kernels
    assert model.features[0](x).is_contiguous(memory_format=torch.channels_last)


def test_gray_input_leaves_an_nchw_model_nchw():
    model = build_model("paper_cnn", 4, image_size=SMALL)
    out = model.features[0](torch.rand(2, 1, SMALL, SMALL))
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)


def _stem_dtypes(model: torch.nn.Module, x: torch.Tensor) -> list[torch.dtype]:
    """The dtype each `features` module outputs in one forward pass."""
    dtypes: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
             for m in model.features]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def test_bf16_stem_runs_only_the_first_block_in_bf16():
    torch.manual_seed(0)
    model = build_model("paper_cnn", 4, image_size=SMALL).eval()
    x = torch.rand(2, 1, SMALL, SMALL)
    assert set(_stem_dtypes(model, x)) == {torch.float32}
    model.bf16_stem = True
    dtypes = _stem_dtypes(model, x)
    stem = type(model).stem_layers
    assert stem == 3  # conv1, pool1, ReLU1
    assert dtypes[:stem] == [torch.bfloat16] * stem
    assert set(dtypes[stem:]) == {torch.float32}


def test_bf16_stem_stays_close_to_fp32_and_trains():
    """Outputs within bf16 rounding of fp32; every parameter gets an fp32 gradient."""
    torch.manual_seed(0)
    model = build_model("paper_cnn", 4, image_size=SMALL)
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.rand(4, 1, SMALL, SMALL)
    with torch.no_grad():
        reference = model(x)
        model.bf16_stem = True
        stem = model(x)
    torch.testing.assert_close(stem, reference, rtol=0.05, atol=0.02)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for param in model.parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32
        assert torch.isfinite(param.grad).all()


def test_bf16_stem_is_not_part_of_the_checkpoint():
    model = build_model("paper_cnn", 4, image_size=CKPT_SIZE)
    model.bf16_stem = True
    checkpoint = make_checkpoint(model, model_name="paper_cnn", classes=CLASSES,
                                 preprocess=PreprocessConfig(image_size=CKPT_SIZE), config={},
                                 metrics={}, epoch=1)
    assert model_from_checkpoint(deserialize(serialize(checkpoint))).bf16_stem is False


# --- sizes, residual net, torchvision models, test-time augmentation ------------------------------


def test_width_scales_bn_cnn_and_res_cnn():
    assert count_parameters(build_model("bn_cnn", 4, 64, {"width": 16})) < count_parameters(
        build_model("bn_cnn", 4, 64)) < count_parameters(build_model("bn_cnn", 4, 64,
                                                                     {"width": 48}))
    deeper = build_model("res_cnn", 4, 64, {"depth": 2})
    assert count_parameters(deeper) > count_parameters(build_model("res_cnn", 4, 64))


def test_an_architecture_argument_the_model_does_not_take_is_refused():
    with pytest.raises(ValueError, match="model paper_cnn does not take width"):
        build_model("paper_cnn", 4, 64, {"width": 48})


def test_the_architecture_travels_in_the_checkpoint():
    # Given a wider bn_cnn's checkpoint
    torch.manual_seed(0)
    model = build_model("bn_cnn", 4, CKPT_SIZE, {"width": 8})
    checkpoint = make_checkpoint(model, model_name="bn_cnn", classes=CLASSES,
                                 preprocess=PreprocessConfig(image_size=CKPT_SIZE), config={},
                                 metrics={}, epoch=1, architecture={"width": 8})
    # When it is loaded, Then the same-size network is rebuilt with the same outputs
    rebuilt = model_from_checkpoint(deserialize(serialize(checkpoint)))
    assert count_parameters(rebuilt) == count_parameters(model)
    x = torch.rand(2, 1, CKPT_SIZE, CKPT_SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_a_checkpoint_with_an_impossible_architecture_is_refused():
    _, checkpoint = _checkpoint("bn_cnn")
    checkpoint["architecture"] = {"depth": 3}
    with pytest.raises(CheckpointError, match="does not take depth"):
        deserialize(serialize(checkpoint))


def test_res_cnn_shortcuts_carry_the_input_when_the_body_is_zero():
    block = BasicBlock(8, 8)
    with torch.no_grad():
        for p in block.body.parameters():
            p.zero_()
    x = torch.rand(1, 8, 4, 4)
    assert torch.equal(block(x), torch.relu(x))


def test_test_time_augmentation_is_read_from_the_checkpoint():
    _, checkpoint = _checkpoint("bn_cnn")
    assert tta_of(checkpoint) == "none"
    assert tta_of({**checkpoint, "test_time_augmentation": "hflip"}) == "hflip"
    with pytest.raises(CheckpointError, match="unknown test-time augmentation"):
        tta_of({**checkpoint, "test_time_augmentation": "rot90"})


# --- model identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", 1.7), ("review_threshold", 0.9), ("test_time_augmentation", "hflip"),
    ("ood_reference", {"mean_range": [0.0, 0.5]})])
def test_anything_that_changes_the_output_changes_the_model_id(field, value):
    _, checkpoint = _checkpoint()
    changed = with_fields(checkpoint, **{field: value})
    assert changed["weights_id"] == checkpoint["weights_id"]
    assert changed["model_id"] != checkpoint["model_id"]
    assert deserialize(serialize(changed))["model_id"] == changed["model_id"]


def test_a_model_id_that_does_not_cover_its_calibration_is_refused():
    _, checkpoint = _checkpoint()
    forged = {**checkpoint, "temperature": 3.0}  # calibration edited, model_id left as it was
    with pytest.raises(CheckpointError, match="model_id does not match"):
        deserialize(serialize(forged))


def test_a_checkpoint_from_before_weights_id_still_loads():
    _, checkpoint = _checkpoint()
    legacy = {k: v for k, v in checkpoint.items() if k != "weights_id"}
    legacy["model_id"] = weights_id(legacy["state_dict"])
    assert deserialize(serialize(legacy))["model_id"] == legacy["model_id"]
    assert with_fields(legacy, temperature=2.0)["weights_id"] == legacy["model_id"]
