"""Grad-CAM heatmaps: which regions of an image drove the model's score for a class.

Grad-CAM (Selvaraju et al., 2017): run the image forward, back-propagate the chosen class's logit
to the last convolution layer, weight each of its feature maps by the mean of its gradient, sum,
keep the positive part, upsample to the image and scale to [0, 1]. Implemented with a forward and
a backward hook on the last `nn.Conv2d` of the network (no extra dependency).

`brainray explain` writes one PNG per image (the image, and the heatmap over it) plus
`explanations.csv`; scoring can write the same overlays for the rows it sends to review.
"""

from __future__ import annotations

import copy
import csv
import io
import posixpath
import re

import numpy as np
import torch
from torch import nn

from brainray import ood, storage
from brainray.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    temperature_of,
)
from brainray.config import ExplainConfig, StorageOptions
from brainray.console import say
from brainray.figures import figure_png, new_figure
from brainray.model import unwrap
from brainray.presets import InferencePreset
from brainray.publish import COL_FRAME, COL_NEEDS_REVIEW, COL_OOD_REASON, COL_SHA256
from brainray.transforms import to_model_input
from brainray.unpack import INPUT, SourceLimits, expand, identify, probe_bytes

FILE_LIST_SUFFIXES = (".txt", ".lst")


def cam_layer(model: nn.Module) -> nn.Module:
    """The layer whose feature map Grad-CAM weighs: the model's own choice (torchvision models
    name their last stage), else its last convolution."""
    return getattr(model, "cam_layer", None) or last_conv(model)


def last_conv(model: nn.Module) -> nn.Conv2d:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


class GradCam:
    """Grad-CAM on a private fp32 copy of a model (in-place ReLUs disabled so hooks see clean
    activations and gradients); the caller's model is never modified."""

    def __init__(self, model: nn.Module, temperature: float = 1.0,
                 device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.model = copy.deepcopy(unwrap(model)).float().to(
            self.device, memory_format=torch.contiguous_format).eval()
        for module in self.model.modules():
            if hasattr(module, "inplace"):
                module.inplace = False
        self.temperature = float(temperature)
        self.layer = cam_layer(self.model)
        self._activations: torch.Tensor | None = None
        self._gradients: torch.Tensor | None = None
        self.layer.register_forward_hook(self._keep_activations)
        self.layer.register_full_backward_hook(self._keep_gradients)

    def _keep_activations(self, module, inputs, output) -> None:
        self._activations = output.detach()

    def _keep_gradients(self, module, grad_input, grad_output) -> None:
        self._gradients = grad_output[0].detach()

    def __call__(self, x: torch.Tensor, target: int | list[int] | np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x: float (N, 3, H, W) in [0, 1]. Returns heatmaps (N, H, W) in [0, 1], the calibrated
        probabilities (N, classes) and the explained class per image (default: the predicted)."""
        x = x.to(self.device, torch.float32).contiguous()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone().requires_grad_(True)  # hooks need a graph even through the first layer
            logits = self.model(x)
            n = logits.shape[0]
            if target is None:
                targets = logits.argmax(1)
            else:
                targets = torch.as_tensor(np.broadcast_to(np.asarray(target), (n,)).copy(),
                                          dtype=torch.int64, device=logits.device)
            if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
                raise ValueError(f"target class must be in [0, {logits.shape[1] - 1}]")
            self.model.zero_grad(set_to_none=True)
            logits.gather(1, targets[:, None]).sum().backward()
        activations, gradients = self._activations, self._gradients
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
        cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear",
                                        align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        cam = (cam / peak).clamp_(0.0, 1.0)
        probs = torch.softmax(logits.detach().float() / self.temperature, dim=1)
        return cam.cpu().numpy(), probs.cpu().numpy(), targets.cpu().numpy()

    def explain_images(self, images: np.ndarray, target=None):
        """The same for a uint8 (N, H, W) gray batch, as the pipeline carries images."""
        return self(to_model_input(torch.from_numpy(np.array(images, dtype=np.uint8))), target)


def render_overlay(image: np.ndarray, cam: np.ndarray, title: str = "",
                   alpha: float = 0.45) -> bytes:
    """PNG: the image on the left, the heatmap (jet colours) blended over it on the right."""
    fig = new_figure((7.0, 3.8))
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
                  interpolation="bilinear")
        ax.set_axis_off()
    heat = right.imshow(cam, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    fig.colorbar(heat, ax=right, fraction=0.046, pad=0.02, label="Grad-CAM")
    left.set_title("input (as the model sees it)", fontsize=9)
    right.set_title("Grad-CAM", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_png(fig)


def caption(classes: list[str], probs: np.ndarray, target: int, ood_reason: str = "",
            cam: np.ndarray | None = None) -> str:
    predicted = int(np.argmax(probs))
    text = (f"predicted {classes[predicted]} ({probs[predicted]:.2f}); heatmap for "
            f"{classes[target]} ({probs[target]:.2f})")
    if cam is not None and not cam.any():
        text += "\nno positive evidence for this class (empty map)"
    return text + (f"\nout of distribution: {ood_reason}" if ood_reason else "")


def overlay_name(uri: str, member: str | None, frame: int | None, sha256: str,
                 target: str) -> str:
    """A readable, collision-free PNG name: file stem, member stem, frame, content hash, class."""
    parts = [posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]]
    if member:
        parts.append(posixpath.splitext(posixpath.basename(member))[0])
    if frame is not None:
        parts.append(f"f{frame}")
    parts += [sha256[:10], target]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p))[:180] + ".png"


def review_overlay_name(sha256: str, frame: int | None) -> str:
    """Scoring's overlay name for a row: derivable from its content_sha256 and frame columns."""
    return f"{sha256}{'' if frame is None else f'-f{int(frame)}'}.png"


def _resolve_target(target: str | None, classes: list[str]) -> int | None:
    if target is None:
        return None
    if target in classes:
        return classes.index(target)
    if target.isdigit() and int(target) < len(classes):
        return int(target)
    raise ValueError(f"--target-class {target!r} is not one of the model's classes {classes} "
                     "(or their index)")


def list_images(inputs: tuple[str, ...], options: StorageOptions) -> list[str]:
    """Supported files under folders/prefixes, single files, and files listed in .txt/.lst files
    (one URI per line; relative paths are resolved against the list's folder)."""
    found: list[str] = []
    for uri in inputs:
        if uri.lower().endswith(FILE_LIST_SUFFIXES):
            base = uri.rsplit("/", 1)[0] if "/" in uri else "."
            for line in storage.read_bytes(uri, options).decode().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    absolute = storage.is_s3(line) or line.startswith(("/", "file://"))
                    found.append(line if absolute else storage.join(base, line))
            continue
        entries = storage.list_files(uri, options)
        if len(entries) == 1 and not storage.is_dir(uri, options):
            found.append(uri)  # a single file is explained whatever its name
            continue
        found += [e.uri for e in entries if _is_input(e.uri, options)]
    return list(dict.fromkeys(found))


def _is_input(uri: str, options: StorageOptions) -> bool:
    """An image, DICOM or archive by its name, or a DICOM by its DICM marker (PACS exports name
    files IM0001 or by UID); DICOMDIRs are indexes, not images. One read per unnamed file is
    fine here: explain handles a few hundred images on the driver."""
    nbytes = probe_bytes(uri)
    if not nbytes:
        return True
    try:
        head = storage.read_head(uri, nbytes, options)
    except storage.StorageError:
        return True  # unreadable now: _items turns that into an error row naming the file
    return identify(uri, head) == INPUT


def _csv_bytes(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    fields = ["uri", "member", "frame", "png", "predicted_label", "confidence", "target_class",
              "target_probability", "out_of_distribution", "error"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _explain_item(cam: GradCam, checkpoint: dict, preset: InferencePreset, item, uri: str,
                  target: int | None, config: ExplainConfig) -> dict:
    """Write one image's overlay; its explanations.csv row (with the error when it has one)."""
    classes = checkpoint["classes"]
    row = {"uri": uri, "member": item.member, "frame": item.frame, "error": item.error}
    if not item.ok:
        return row
    try:
        pixels, colour = preset.image(item.image)
    except (OSError, ValueError) as exc:
        return {**row, "error": f"cannot preprocess image: {exc}"}
    heat, probs, targets = cam.explain_images(pixels[None], target)
    flagged, reasons = ood.check(pixels[None], checkpoint.get("ood_reference"),
                                 np.array([colour]))
    explained = int(targets[0])
    name = overlay_name(uri, item.member, item.frame, item.content_sha256, classes[explained])
    storage.write_bytes(storage.join(config.output, name), render_overlay(
        pixels, heat[0], caption(classes, probs[0], explained, reasons[0], heat[0])),
        config.storage)
    return {**row, "png": name, "predicted_label": classes[int(probs[0].argmax())],
            "confidence": float(probs[0].max()), "target_class": classes[explained],
            "target_probability": float(probs[0][explained]),
            "out_of_distribution": bool(flagged[0])}


def _items(files: list[str], options: StorageOptions, limits: SourceLimits):
    """(uri, image item) for every image in the files, or (uri, error row) for an unreadable
    file."""
    for uri in files:
        try:
            # seekable, so a zip works too; images are yielded as they are decoded
            with storage.open_seekable(uri, options) as source:
                for item in expand(uri, source, limits):
                    yield uri, item
        except storage.StorageError as exc:
            yield uri, {"uri": uri, "error": str(exc)}


def run_explain(config: ExplainConfig) -> dict:
    """`brainray explain`: Grad-CAM overlays for chosen images (runs on the driver, no Ray)."""
    options = config.storage
    storage.ensure_writable(config.output, options)
    checkpoint = load_checkpoint(config.model, options)
    classes = checkpoint["classes"]
    target = _resolve_target(config.target_class, classes)
    preset = InferencePreset.of(checkpoint)
    cam = GradCam(model_from_checkpoint(checkpoint), temperature_of(checkpoint))
    files = list_images(config.inputs, options)
    say(f"explaining up to {config.max_images} image(s) from {len(files)} file(s) with "
          f"{checkpoint['model_name']} ({checkpoint['model_id']}), Grad-CAM on the last "
          f"convolution, target {'the predicted class' if target is None else classes[target]}")
    rows: list[dict] = []
    written = 0
    limits = SourceLimits(max_image_pixels=preset.preprocess.max_image_pixels)
    for uri, item in _items(files, options, limits):
        if written >= config.max_images:
            break
        rows.append(item if isinstance(item, dict) else _explain_item(
            cam, checkpoint, preset, item, uri, target, config))
        written += bool(rows[-1].get("png"))
    storage.write_bytes(storage.join(config.output, "explanations.csv"), _csv_bytes(rows), options)
    errors = sum(1 for r in rows if r.get("error"))
    say(f"wrote {written} overlay(s) and explanations.csv to {storage.redact(config.output)}"
          + (f"; {errors} input(s) could not be explained (see the csv)" if errors else ""))
    return {"images": written, "errors": errors, "rows": rows}


class ReviewOverlays:
    """A scoring step (one model per actor): writes the Grad-CAM overlay of every row sent to
    review, named by content hash, and passes the rows on without their images.

    A failure to explain or write one overlay is printed and skipped: it never fails scoring.
    """

    def __init__(self, model_uri: str, output: str, options: StorageOptions,
                 use_gpu: bool = False):
        checkpoint = load_checkpoint(model_uri, options)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.cam = GradCam(model_from_checkpoint(checkpoint), temperature_of(checkpoint), device)
        self.classes, self.output, self.options = checkpoint["classes"], output, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.flatnonzero(np.asarray(batch[COL_NEEDS_REVIEW], dtype=bool))
        self.write(batch["image"][rows], [batch[COL_SHA256][i] for i in rows],
                   [batch[COL_FRAME][i] for i in rows], [batch[COL_OOD_REASON][i] for i in rows])
        return {k: v for k, v in batch.items() if k != "image"}

    def write(self, images: np.ndarray, sha256s, frames, reasons: list[str]) -> int:
        if len(images) == 0:
            return 0
        try:
            heat, probs, targets = self.cam.explain_images(images)
        except Exception as exc:  # explaining is best effort next to the scores themselves
            print(f"explain: Grad-CAM failed for {len(images)} image(s): {exc}", flush=True)
            return 0
        written = 0
        for i, (sha, frame) in enumerate(zip(sha256s, frames, strict=True)):
            try:
                # Ray hands an all-null column back as float NaN
                missing = frame is None or (isinstance(frame, float | np.floating)
                                            and np.isnan(frame))
                frame = None if missing else int(frame)
                png = render_overlay(images[i], heat[i], caption(
                    self.classes, probs[i], int(targets[i]), reasons[i], heat[i]))
                storage.write_bytes(storage.join(self.output, review_overlay_name(sha, frame)),
                                    png, self.options)
                written += 1
            except Exception as exc:
                print(f"explain: cannot write the overlay of {sha}: {exc}", flush=True)
        return written
