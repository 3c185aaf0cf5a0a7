"""Export: TorchScript (always) and ONNX (when installed) give the same calibrated probabilities
as brainray's own Predictor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from brainray import cli, export
from brainray.checkpoint import make_checkpoint, serialize, with_fields
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.model import build_model
from brainray.predict import Predictor
from brainray.transforms import preprocess_image, to_model_input
from tests.conftest import synthetic_scan

SIZE = 32


# (model, test-time augmentation): the exported graph must hold the flip views too.
@pytest.fixture(scope="module", params=[("paper_cnn", "none"), ("bn_cnn", "none"),
                                        ("res_cnn", "hflip"), ("resnet18", "hflip")],
                ids=lambda p: "-".join(p))
def checkpoint(request, tmp_path_factory):
    name, tta = request.param
    torch.manual_seed(0)
    model = build_model(name, 4, SIZE)
    payload = with_fields(make_checkpoint(model, model_name=name, classes=DEFAULT_CLASSES,
                                          preprocess=PreprocessConfig(SIZE), config={},
                                          metrics={}, epoch=1, test_time_augmentation=tta),
                          temperature=1.7, review_threshold=0.8)
    path = tmp_path_factory.mktemp("export") / "model.pt"
    path.write_bytes(serialize(payload))
    return payload, path


def _images() -> np.ndarray:
    return np.stack([preprocess_image(synthetic_scan(i % 4, i, 48, "RGB"), PreprocessConfig(SIZE))
                     for i in range(6)])


def _exported_input(images: np.ndarray) -> torch.Tensor:
    """What export.json tells a user to feed: the gray image in [0, 1] copied to 3 channels."""
    return to_model_input(torch.from_numpy(images)).repeat(1, 3, 1, 1).contiguous()


def test_torchscript_matches_the_predictor_to_1e_4(checkpoint, tmp_path):
    payload, path = checkpoint
    scripted = torch.jit.load(io.BytesIO(export.to_torchscript(payload)))
    images = _images()
    expected = Predictor(str(path), StorageOptions()).predict(images)
    with torch.no_grad():
        got = scripted(_exported_input(images)).numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)  # calibrated probabilities, not logits
    with torch.no_grad():  # any batch size
        assert scripted(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 4)


def test_export_cli_writes_torchscript_and_metadata(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    out = tmp_path / "exported"
    assert cli.run(["export", "--model", str(path), "--output", str(out)]) == 0
    assert (out / "model.ts").stat().st_size > 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["classes"] == list(DEFAULT_CLASSES) and meta["temperature"] == 1.7
    assert meta["image_size"] == SIZE and "calibrated" in meta["output"]["meaning"]
    printed = capsys.readouterr().out
    if export.onnx_available():
        assert (out / "model.onnx").exists() and "model.onnx" in meta["files"]
    else:
        assert "onnx" in printed.lower() and "skipped" in printed
        assert meta["files"] == ["model.ts"]


def test_onnx_is_valid_and_matches_the_predictor(checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")  # optional: skipped where onnx is not installed
    payload, path = checkpoint
    data = export.to_onnx(payload)
    onnx.checker.check_model(onnx.load_from_string(data))
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(data)
    images = _images()
    expected = Predictor(str(path), StorageOptions()).predict(images)
    (got,) = session.run(None, {"image": _exported_input(images).numpy()})
    assert np.abs(got - expected).max() < 1e-4
