"""Pure preprocessing shared by training, evaluation and scoring, plus training-only augmentation.

Images travel through the pipeline as uint8 gray HxW arrays: MRI is one intensity per pixel, so
the paper's grayscale-to-RGB copy is left to the model's first convolution (`GrayInputConv2d`),
which computes exactly what three copies would give. That makes every cached image, batch and
augmentation a third of the RGB size. `to_model_input` scales them to [0, 1] on the device, and
`augment_batch` applies seeded random augmentation there.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from brainray.config import AugmentConfig, PreprocessConfig


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (empty, truncated, corrupt, too large, not an image)."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into a fully loaded PIL image, refusing empty, oversized and broken files."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, on huge images; we check the size ourselves before loading.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, over the limit of {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"not a decodable image: {exc}") from exc
    return image


def _high_depth_to_uint8(image: Image.Image) -> Image.Image:
    # 16-bit and float scans rarely use their full range; stretch the image's own range to 8 bits
    # the way a viewer's default window would, instead of clipping at 255.
    array = np.asarray(image, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def to_8bit(image: Image.Image) -> Image.Image:
    """Any mode (L, I;16, F, P, RGBA, CMYK, LA, 1) to 8-bit "L" (gray stays one channel) or
    "RGB", upright per its EXIF."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_uint8(image)
    if image.mode == "L":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Composite onto black: MRI background is black, so transparent pixels stay background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_image(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Decoded image -> 8-bit "L" or "RGB" image of size x size (aspect ratio not kept).

    Colour is kept here so that scoring's out-of-distribution check can still see it; gray images
    are resized as one channel, a third of the work of resizing their RGB copy.
    """
    image = to_8bit(image)
    size = (config.image_size, config.image_size)
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def gray_array(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) of an "L" or "RGB" image. For RGB, ITU-R 601 luma, which is exact (R) when the
    three channels are equal, as they are in gray scans saved as RGB."""
    return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Decoded image -> the model's input as the pipeline carries it: uint8 gray (size, size)."""
    return gray_array(resize_image(image, config))


def preprocess_bytes(data: bytes, config: PreprocessConfig) -> np.ndarray:
    return preprocess_image(decode_image(data, config.max_image_pixels), config)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 gray (N, H, W) -> float32 (N, 1, H, W) in [0, 1]; RGB (N, H, W, 3) -> (N, 3, H, W).

    Both come out channels-last in memory (the layout the convolutions run fastest in): the
    permute is a free view of NHWC data, so no copy is made before the division.
    """
    if images.dtype == torch.uint8 and images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def inference_views(x: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """The views of a model-input batch whose logits inference averages: the batch itself, and
    with tta "hflip" its left-right mirror too (axial slices are near-symmetric, and training
    flips them the same way)."""
    if tta == "hflip":
        return [x, x.flip(-1)]
    if tta != "none":
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose none or hflip")
    return [x]


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _flip_signs(generator: torch.Generator, n: int, prob: float) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=generator) < prob, -1.0, 1.0)


def sample_affine(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-image (n, 2, 3) affine matrices: rotation, flips, zoom and shift in one transform."""
    angle = _uniform(generator, n, -config.rotation_deg, config.rotation_deg) * (math.pi / 180)
    zoom = _uniform(generator, n, config.zoom_min, config.zoom_max)
    shift = _uniform(generator, 2 * n, -config.translate_fraction, config.translate_fraction)
    flip_x = _flip_signs(generator, n, config.hflip_prob)
    flip_y = _flip_signs(generator, n, config.vflip_prob)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coordinates to input ones: zoom > 1 samples a smaller input area.
    theta = torch.stack([
        torch.stack([cos * flip_x, -sin * flip_y, 2 * shift[:n]], dim=1),
        torch.stack([sin * flip_x, cos * flip_y, 2 * shift[n:]], dim=1),
    ], dim=1)
    return theta


def augment_batch(images: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Random geometric + intensity augmentation of a float (N, C, H, W) batch in [0, 1].

    Parameters come only from `generator` (kept on the CPU), so a seed reproduces the batch on any
    device; the pixel work runs wherever `images` lives.
    """
    n = images.shape[0]
    theta = sample_affine(n, config, generator).to(images.device, images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    brightness = _uniform(generator, n, 1 - config.brightness, 1 + config.brightness)
    contrast = _uniform(generator, n, 1 - config.contrast, 1 + config.contrast)
    b = brightness.to(images.device, images.dtype).view(n, 1, 1, 1)
    c = contrast.to(images.device, images.dtype).view(n, 1, 1, 1)
    # Brightness (x * b), then contrast about the brightened mean ((y - m) * c + m with
    # m = b * mean(x)), folded into one in-place multiply-add: half the passes over the batch,
    # which is memory-bound work inside the training step on CPU.
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return out.mul_(b * c).add_(b * mean * (1 - c)).clamp_(0.0, 1.0)


def augmentation_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A generator whose stream is fixed by (seed, epoch, rank): reruns augment identically."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
