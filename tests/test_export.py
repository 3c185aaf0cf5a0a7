"""Export: TorchScript, the torch.export program and ONNX give the same calibrated probabilities
as brainray's own Predictor, at batch sizes other than the traced one."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from brainray import cli, export
from brainray.checkpoint import make_checkpoint, serialize, with_fields
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.model import build_model
from brainray.predict import Predictor
from brainray.transforms import preprocess_image, to_model_input
from tests.conftest import synthetic_scan

SIZE = 32
# export.example_input traces with a batch of 2; neither size here is 2, so a batch axis fixed
# at export time fails these tests.
BATCH_SIZES = (6, 1)
TOLERANCE = 1e-4  # largest difference from the Predictor's probabilities (README-export.md)
HEAD_SCALE = 30.0  # see _decisive
ALL_FILES = ["model.ts", "model.pt2", "model.onnx"]


def _decisive(model: nn.Module) -> nn.Module:
    """An untrained net's logits are near zero, so its probabilities barely move with the input:
    res_cnn's mirror view changed them by under 1e-4, and a graph without it passed. Scaling the
    last layer spreads the logits, so a missing view or temperature is well above the tolerance
    (test_the_fixture_models_tell_a_missing_view_or_temperature_apart checks that)."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(HEAD_SCALE)
        head.bias.mul_(HEAD_SCALE)
    return model


def _save_checkpoint(name: str, tta: str, directory) -> tuple[dict, object]:
    torch.manual_seed(0)
    model = _decisive(build_model(name, 4, SIZE))
    payload = with_fields(make_checkpoint(model, model_name=name, classes=DEFAULT_CLASSES,
                                          preprocess=PreprocessConfig(SIZE), config={},
                                          metrics={}, epoch=1, test_time_augmentation=tta),
                          temperature=1.7, review_threshold=0.8)
    path = directory / "model.pt"
    path.write_bytes(serialize(payload))
    return payload, path


# (model, test-time augmentation): the exported graph must hold the flip views too.
@pytest.fixture(scope="module", params=[("paper_cnn", "none"), ("bn_cnn", "none"),
                                        ("res_cnn", "hflip"), ("resnet18", "hflip")],
                ids=lambda p: "-".join(p))
def checkpoint(request, tmp_path_factory):
    return _save_checkpoint(*request.param, tmp_path_factory.mktemp("export"))


@pytest.fixture
def small_checkpoint(tmp_path):
    """One cheap model, for tests of the command's behaviour rather than of a network."""
    return _save_checkpoint("paper_cnn", "none", tmp_path)


def _required(name: str):
    """onnx and onnxruntime are in the [test] extra: missing, they fail the test, not skip it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.fail(f"{name} is not installed; pip install -e '.[test]' (or '.[onnx]')")


def _images(n: int) -> np.ndarray:
    return np.stack([preprocess_image(synthetic_scan(i % 4, i, 48, "RGB"), PreprocessConfig(SIZE))
                     for i in range(n)])


def _exported_input(images: np.ndarray) -> torch.Tensor:
    """What export.json tells a user to feed: the gray image in [0, 1] copied to 3 channels."""
    return to_model_input(torch.from_numpy(images)).repeat(1, 3, 1, 1).contiguous()


def _torch_runner(module):
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()
    return run


def _assert_matches_predictor(run, path) -> None:
    """`run` (exported input -> probabilities as numpy) agrees with the Predictor."""
    predictor = Predictor(str(path), StorageOptions())
    for n in BATCH_SIZES:
        images = _images(n)
        got = run(_exported_input(images))
        assert got.shape == (n, len(DEFAULT_CLASSES)), f"batch {n}"
        assert np.abs(got - predictor.predict(images)).max() < TOLERANCE, f"batch {n}"
        assert np.allclose(got.sum(1), 1.0, atol=1e-5)  # calibrated probabilities, not logits


def test_the_fixture_models_tell_a_missing_view_or_temperature_apart(checkpoint):
    # given a fixture model and its Predictor
    payload, path = checkpoint
    images = _images(BATCH_SIZES[0])
    predictor = Predictor(str(path), StorageOptions())
    expected = predictor.predict(images)
    # when the temperature or (for hflip) the mirror view is left out
    predictor.temperature = 1.0
    without_temperature = predictor.predict(images)
    # then the probabilities move by far more than the parity tests' tolerance
    assert np.abs(without_temperature - expected).max() > 10 * TOLERANCE
    if payload["test_time_augmentation"] == "hflip":
        without_flip = Predictor(str(path), StorageOptions(), tta="none").predict(images)
        assert np.abs(without_flip - expected).max() > 10 * TOLERANCE


def test_torchscript_matches_the_predictor_at_two_batch_sizes(checkpoint):
    # given a checkpoint; when it is exported to TorchScript and loaded with torch.jit.load
    payload, path = checkpoint
    scripted = torch.jit.load(io.BytesIO(export.to_torchscript(payload)))
    # then its probabilities are the Predictor's at any batch size
    _assert_matches_predictor(_torch_runner(scripted), path)


def test_exported_program_matches_the_predictor_at_two_batch_sizes(checkpoint, tmp_path):
    # given a checkpoint; when model.pt2 is written and loaded as its README says
    payload, path = checkpoint
    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(export.to_exported_program(payload))
    program = torch.export.load(str(pt2)).module()
    # then its probabilities are the Predictor's at any batch size
    _assert_matches_predictor(_torch_runner(program), path)


def test_onnx_is_valid_and_matches_the_predictor_at_two_batch_sizes(checkpoint):
    onnx, onnxruntime = _required("onnx"), _required("onnxruntime")
    # given a checkpoint; when it is exported to ONNX
    payload, path = checkpoint
    data = export.to_onnx(payload)
    # then the file passes onnx's checker and onnxruntime gives the Predictor's probabilities
    onnx.checker.check_model(onnx.load_from_string(data))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    _assert_matches_predictor(lambda x: session.run(None, {"image": x.numpy()})[0], path)


def test_export_cli_writes_every_format_and_lists_it(checkpoint, tmp_path):
    _required("onnx")
    # given a checkpoint; when `brainray export` runs
    _, path = checkpoint
    out = tmp_path / "exported"
    assert cli.run(["export", "--model", str(path), "--output", str(out)]) == 0
    # then every format is written and export.json lists it with the calibration
    meta = json.loads((out / "export.json").read_text())
    assert meta["files"] == ALL_FILES
    assert all((out / name).stat().st_size > 0 for name in ALL_FILES)
    assert meta["classes"] == list(DEFAULT_CLASSES) and meta["temperature"] == 1.7
    assert meta["image_size"] == SIZE and "calibrated" in meta["output"]["meaning"]
    assert meta["torch_version"] == torch.__version__


def test_export_cli_without_onnx_writes_the_rest_and_says_onnx_was_skipped(
        small_checkpoint, tmp_path, capsys, monkeypatch):
    # given a machine without the onnx package
    monkeypatch.setattr(export, "onnx_available", lambda: False)
    _, path = small_checkpoint
    out = tmp_path / "exported"
    # when `brainray export` runs
    assert cli.run(["export", "--model", str(path), "--output", str(out)]) == 0
    # then it writes TorchScript and model.pt2, and says why there is no model.onnx
    printed = capsys.readouterr().out
    assert "onnx" in printed.lower() and "skipped" in printed
    assert json.loads((out / "export.json").read_text())["files"] == ["model.ts", "model.pt2"]
    assert not (out / "model.onnx").exists()


def test_export_cli_fails_in_one_line_when_torch_export_fails(
        small_checkpoint, tmp_path, capsys, monkeypatch):
    # given a model torch.export cannot capture
    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\n  long detail the user need not see")

    monkeypatch.setattr(torch.export, "export", refuse)
    _, path = small_checkpoint
    out = tmp_path / "exported"
    # when `brainray export` runs
    assert cli.run(["export", "--model", str(path), "--output", str(out)]) == 1
    # then it names model.pt2 and the reason in one line, and writes nothing
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    assert "model.pt2" in error[0] and "torch.export" in error[0]
    assert "data-dependent control flow" in error[0] and "paper_cnn" in error[0]
    assert not out.exists() or not any(out.iterdir())
