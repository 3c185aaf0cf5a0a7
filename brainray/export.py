"""Export a checkpoint for use without brainray: TorchScript and a torch.export program always,
ONNX when `onnx` is installed.

The exported network includes the checkpoint's temperature and the softmax, so it outputs
**calibrated probabilities**, exactly what `brainray score` reports:

    input  "image":         float32 (N, 3, S, S) in [0, 1], gray copied to 3 channels
                            (S = image_size in export.json)
    output "probabilities": float32 (N, classes) = softmax(logits / T), in export.json's order

Preprocessing stays outside: decode, resize to S x S (bilinear, aspect ratio not kept), convert to
8-bit gray (PIL's `convert("L")`, ITU-R 601 luma, for colour inputs), divide by 255, copy to 3
channels. That is the paper's grayscale-to-RGB input; brainray itself feeds the one gray channel
(`brainray.model.GrayInputConv2d`), which gives the same probabilities.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
import warnings

import torch
from torch import nn

from brainray import storage
from brainray.checkpoint import load_checkpoint, model_from_checkpoint, temperature_of, tta_of
from brainray.config import ExportConfig
from brainray.console import say
from brainray.transforms import inference_views

TORCHSCRIPT_FILE = "model.ts"
EXPORTED_PROGRAM_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
METADATA_FILE = "export.json"
ONNX_OPSET = 17


class CalibratedClassifier(nn.Module):
    """A model plus its temperature and softmax: images in [0, 1] -> calibrated probabilities."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, tta: str = "none"):
        super().__init__()
        self.model = model
        self.tta = tta  # fixed when traced: the exported graph holds every view
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([self.model(view) for view in inference_views(image, self.tta)])
        return torch.softmax(logits.mean(0) * self.inv_temperature, dim=1)


def calibrated_module(checkpoint: dict) -> CalibratedClassifier:
    model = model_from_checkpoint(checkpoint).float()
    for module in model.modules():  # in-place ops are fine in eval, but plainer graphs export
        if hasattr(module, "inplace"):
            module.inplace = False
    return CalibratedClassifier(model, temperature_of(checkpoint), tta_of(checkpoint)).eval()


def example_input(checkpoint: dict, batch: int = 2) -> torch.Tensor:
    size = checkpoint["preprocess"]["image_size"]
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def dynamic_batch() -> dict:
    """torch.export's `dynamic_shapes` for the one input: any batch size, fixed S x S."""
    return {"image": {0: torch.export.Dim("batch", min=1)}}


def to_torchscript(checkpoint: dict) -> bytes:
    module = calibrated_module(checkpoint)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch >= 2.9 marks TorchScript deprecated (FutureWarning); it still loads everywhere
        # libtorch does (C++ without Python), which is why it is kept beside model.pt2.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example_input(checkpoint))
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def to_exported_program(checkpoint: dict) -> bytes:
    """model.pt2 bytes: a torch.export program (dynamic batch) for `torch.export.load(f).module()`.

    Raises RuntimeError with a one-line reason when the model does not export: unlike ONNX, this
    file needs no optional package, so a failure is the model's, and is not skipped quietly.
    """
    module = calibrated_module(checkpoint)
    try:
        program = torch.export.export(module, (example_input(checkpoint),),
                                      dynamic_shapes=dynamic_batch())
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        raise RuntimeError(f"cannot write {EXPORTED_PROGRAM_FILE}: torch.export of "
                           f"{checkpoint['model_name']} ({checkpoint['model_id']}) failed, "
                           f"nothing was written: {reason}") from exc
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def onnx_available() -> bool:
    return importlib.util.find_spec("onnx") is not None


def to_onnx(checkpoint: dict) -> bytes:
    """ONNX bytes (opset 17, dynamic batch); needs the `onnx` package (ImportError without)."""
    if not onnx_available():
        raise ImportError("the onnx package is not installed")
    module = calibrated_module(checkpoint)
    names = {"input_names": ["image"], "output_names": ["probabilities"],
             "opset_version": ONNX_OPSET}
    with tempfile.TemporaryDirectory() as directory, torch.no_grad(), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(directory, ONNX_FILE)
        try:  # the TorchScript-based exporter: needs only onnx
            torch.onnx.export(module, (example_input(checkpoint),), path, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                              **names)
        except Exception as legacy_error:  # removed in some torch versions: torch.export based
            try:
                torch.onnx.export(module, (example_input(checkpoint),), path, dynamo=True,
                                  external_data=False,
                                  dynamic_shapes=dynamic_batch(),
                                  **names)
            except Exception as exc:
                raise RuntimeError(f"ONNX export failed ({legacy_error}; then {exc})") from exc
        with open(path, "rb") as f:
            return f.read()


def export_metadata(checkpoint: dict, files: list[str]) -> dict:
    return {
        "model_id": checkpoint["model_id"], "model_name": checkpoint["model_name"],
        "classes": checkpoint["classes"], "image_size": checkpoint["preprocess"]["image_size"],
        "temperature": temperature_of(checkpoint),
        "review_threshold": checkpoint.get("review_threshold"),
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, "S", "S"],
                  "range": [0.0, 1.0], "channels": "gray (8-bit luma) copied to 3 channels",
                  "resize": "bilinear to S x S, aspect ratio not kept"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", "classes"],
                   "meaning": "calibrated class probabilities softmax(logits / temperature); "
                              "with test_time_augmentation hflip the logits are the mean over "
                              "the image and its left-right mirror, inside the exported graph"},
        "test_time_augmentation": tta_of(checkpoint),
        # torch.export.save warns its files may not load in other PyTorch versions: this is the
        # one that wrote model.pt2 (and model.ts).
        "torch_version": torch.__version__,
        "files": files,
    }


def exported_files(checkpoint: dict, want_onnx: bool) -> tuple[dict[str, bytes], str | None]:
    """Every file's bytes by name, made before any is written (a failing export leaves no partial
    folder), and a note when ONNX is not among them."""
    files = {TORCHSCRIPT_FILE: to_torchscript(checkpoint),
             EXPORTED_PROGRAM_FILE: to_exported_program(checkpoint)}
    written = f"{TORCHSCRIPT_FILE} and {EXPORTED_PROGRAM_FILE} were written"
    if not want_onnx:
        return files, "ONNX export not requested (--no-onnx)"
    if not onnx_available():
        return files, ("ONNX export skipped: the `onnx` package is not installed "
                       f"(pip install 'brainray[onnx]'); {written}")
    try:
        files[ONNX_FILE] = to_onnx(checkpoint)
    except Exception as exc:  # the other formats stand on their own; ONNX is the optional extra
        return files, f"ONNX export failed, {written}: {exc}"
    return files, None


def run_export(config: ExportConfig) -> dict:
    """`brainray export`: model.ts, model.pt2 (+ model.onnx) and export.json in the output."""
    options = config.storage
    storage.ensure_writable(config.output, options)
    checkpoint = load_checkpoint(config.model, options)
    files, onnx_note = exported_files(checkpoint, config.onnx)
    for name, data in files.items():
        storage.write_bytes(storage.join(config.output, name), data, options)
    metadata = export_metadata(checkpoint, list(files))
    storage.write_bytes(storage.join(config.output, METADATA_FILE),
                        json.dumps(metadata, indent=2).encode(), options)
    say(f"exported {checkpoint['model_name']} ({checkpoint['model_id']}, temperature "
        f"{metadata['temperature']:.3f}) to {storage.redact(config.output)}: "
        f"{', '.join(files)} + {METADATA_FILE}; outputs are calibrated probabilities")
    if onnx_note:
        say(onnx_note)
    return {**metadata, "onnx_note": onnx_note}
