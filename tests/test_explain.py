"""Grad-CAM: maps, overlays, and `brainray explain` on folders and file lists (no Ray)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainray import cli
from brainray.checkpoint import make_checkpoint, serialize, with_fields
from brainray.config import DEFAULT_CLASSES, PreprocessConfig, StorageOptions
from brainray.explain import GradCam, last_conv, list_images, overlay_name, render_overlay
from brainray.model import build_model
from brainray.transforms import preprocess_image, to_model_input
from tests.conftest import encode, synthetic_scan, write_tree
from tests.test_unpack import _dicom

SIZE = 32


def _scans(n_per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label in range(4):
        for i in range(n_per_class):
            images.append(preprocess_image(synthetic_scan(label, offset + i, SIZE),
                                           PreprocessConfig(SIZE)))
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    """A paper CNN trained for a few steps on the synthetic scans (class = blob position), so
    its maps mean something."""
    torch.manual_seed(0)
    model = build_model("paper_cnn", 4, SIZE)
    images, labels = _scans(6)
    x = to_model_input(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint_file(trained, tmp_path_factory) -> Path:
    payload = with_fields(make_checkpoint(
        trained, model_name="paper_cnn", classes=DEFAULT_CLASSES,
        preprocess=PreprocessConfig(SIZE), config={}, metrics={}, epoch=1), temperature=1.5)
    path = tmp_path_factory.mktemp("explain-model") / "model.pt"
    path.write_bytes(serialize(payload))
    return path


def test_grad_cam_map_is_not_uniform_and_depends_on_the_target_class(trained):
    images, labels = _scans(2, offset=100)
    cam = GradCam(trained)
    maps, probs, targets = cam.explain_images(images)
    assert maps.shape == (len(images), SIZE, SIZE)
    assert (targets == probs.argmax(1)).all()
    assert (maps.reshape(len(images), -1).std(axis=1) > 0).all()  # the predicted class
    assert maps.min() >= 0 and np.isclose(maps.reshape(len(images), -1).max(1), 1).all()
    per_class = np.stack([cam.explain_images(images[:1], k)[0][0] for k in range(4)])
    differences = [np.abs(per_class[a] - per_class[b]).max() for a in range(4)
                   for b in range(a + 1, 4)]
    assert max(differences) > 0.1
    assert np.abs(per_class[targets[0]] - maps[0]).max() < 1e-5  # default = predicted class


def test_grad_cam_leaves_the_callers_model_untouched_and_hooks_the_last_conv(trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    cam = GradCam(trained)
    cam.explain_images(_scans(1)[0])
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert cam.layer is last_conv(cam.model) and cam.layer.out_channels == 128
    assert all(p.grad is None for p in trained.parameters())
    with pytest.raises(ValueError):
        cam.explain_images(_scans(1)[0][:1], 7)


def test_grad_cam_works_for_the_batch_norm_model():
    torch.manual_seed(0)
    model = build_model("bn_cnn", 4, SIZE).eval()
    maps, _, _ = GradCam(model).explain_images(_scans(1)[0], 2)
    assert maps.shape == (4, SIZE, SIZE) and np.isfinite(maps).all()


def test_overlay_is_a_png_with_both_panels():
    image = preprocess_image(synthetic_scan(0, 0, SIZE), PreprocessConfig(SIZE))
    png = render_overlay(image, np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE), "title")
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG" and decoded.width > decoded.height


def test_overlay_names_are_safe_and_distinct():
    a = overlay_name("s3://b/x/scan 1.dcm", None, 2, "ab" * 32, "glioma")
    b = overlay_name("s3://b/x/scan 1.dcm", None, 3, "ab" * 32, "glioma")
    assert a != b and a.endswith(".png") and " " not in a and "/" not in a


def test_explain_cli_writes_overlays_for_a_folder_and_a_file_list(checkpoint_file, tmp_path):
    # Given a folder with three scans and a non-image, and a list file naming two of the scans
    files = {f"in/scan_{i}.png": encode(synthetic_scan(i, 200 + i)) for i in range(3)}
    files["in/notes.txt"] = b"not an image"
    root = write_tree(tmp_path, files)
    (root / "chosen.txt").write_text("in/scan_0.png\n# a comment\nin/scan_2.png\n")

    # When explaining the folder for the predicted class, and the list for class glioma
    assert cli.run(["explain", "--model", str(checkpoint_file), "--input", str(root / "in"),
                    "--output", str(tmp_path / "out")]) == 0
    assert cli.run(["explain", "--model", str(checkpoint_file), "--input",
                    str(root / "chosen.txt"), "--output", str(tmp_path / "listed"),
                    "--target-class", "glioma"]) == 0

    # Then each image gets an overlay PNG and a row in explanations.csv
    rows = list(csv.DictReader((tmp_path / "out" / "explanations.csv").open()))
    assert len(rows) == 3 and all(r["png"] and not r["error"] for r in rows)
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    listed = list(csv.DictReader((tmp_path / "listed" / "explanations.csv").open()))
    assert [Path(r["uri"]).name for r in listed] == ["scan_0.png", "scan_2.png"]
    assert {r["target_class"] for r in listed} == {"glioma"}
    assert all(r["png"].endswith("-glioma.png") for r in listed)
    assert all(0 < float(r["confidence"]) <= 1 for r in listed)


def test_explain_rejects_an_unknown_target_class(checkpoint_file, tmp_path, capsys):
    write_tree(tmp_path, {"in/a.png": encode(synthetic_scan(0, 0))})
    code = cli.run(["explain", "--model", str(checkpoint_file), "--input", str(tmp_path / "in"),
                    "--output", str(tmp_path / "out"), "--target-class", "astrocytoma"])
    assert code == 1
    assert "astrocytoma" in capsys.readouterr().err


def test_explain_finds_extensionless_dicoms_in_a_folder(tmp_path):
    # given a PACS-style export: DICOMs without extension beside a non-DICOM file without one
    dicom = _dicom(np.zeros((8, 8), dtype=np.uint16))
    write_tree(tmp_path, {"IM0001": dicom, "IM0002": dicom, "LOCKFILE": b"x" * 200})
    # when its images are listed / then both DICOMs, and nothing else
    assert list_images((str(tmp_path),), StorageOptions()) == [
        str(tmp_path / "IM0001"), str(tmp_path / "IM0002")]
