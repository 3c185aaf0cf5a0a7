"""Tests for brainray.transforms: decoding, preprocessing, model input and augmentation."""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from brainray.config import AugmentConfig, PreprocessConfig
from brainray.transforms import (
    ImageDecodeError,
    augment_batch,
    augmentation_generator,
    decode_image,
    preprocess_bytes,
    preprocess_image,
    resize_image,
    sample_affine,
    to_8bit,
    to_model_input,
)

MAX_PIXELS = 64_000_000
NEUTRAL = AugmentConfig(rotation_deg=0.0, hflip_prob=0.0, vflip_prob=0.0, zoom_min=1.0,
                        zoom_max=1.0, translate_fraction=0.0, brightness=0.0, contrast=0.0)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _noise_image(size=(40, 30), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = (rng.random((size[1], size[0], channels)) * 255).astype(np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR declares `width` x `height` (8-bit grayscale), with no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))


def _batch(n=3, size=16, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=generator)


# --- decode_image -------------------------------------------------------------------------------


def test_decode_valid_png_and_jpeg_returns_loaded_image():
    # Given valid PNG and JPEG bytes of a 40x30 image
    for fmt in ("PNG", "JPEG"):
        data = _encode(_noise_image(), fmt)
        # When decoded
        image = decode_image(data, MAX_PIXELS)
        # Then the full image is available with its size
        assert image.size == (40, 30)
        assert np.asarray(image).shape == (30, 40, 3)


def test_decode_empty_bytes_raises_readable_error():
    # Given no bytes at all / When decoded / Then the message says the file is empty
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_decode_truncated_file_raises(fmt, keep):
    # Given a valid image file cut short (header intact, pixel data missing)
    data = _encode(_noise_image(size=(64, 64)), fmt)
    truncated = data[: int(len(data) * keep)]
    # When decoded / Then ImageDecodeError with a message, not a PIL/zlib exception
    with pytest.raises(ImageDecodeError) as info:
        decode_image(truncated, MAX_PIXELS)
    assert str(info.value).strip()


@pytest.mark.parametrize("data", [
    b"patient_id,diagnosis\n17,glioma\n" * 20,
    b"\x89PNG\r\n",  # just the start of a signature
    np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
], ids=["text", "signature-only", "random"])
def test_decode_non_image_bytes_raises(data):
    # Given bytes that are not an image / When decoded / Then a readable ImageDecodeError
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(data, MAX_PIXELS)


def test_decode_refuses_decompression_bomb_header():
    # Given a tiny PNG whose header declares 20000x20000 pixels (400 megapixels)
    data = _png_header_only(20_000, 20_000)
    assert len(data) < 100
    # When decoded / Then it is refused before any pixel buffer is allocated
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, MAX_PIXELS)
    assert "large" in str(info.value) or "limit" in str(info.value)


def test_decode_refuses_image_over_max_pixels():
    # Given a normal 40x30 image and a limit of 1000 pixels
    data = _encode(_noise_image(), "PNG")
    # When decoded / Then the message names the size and the limit
    with pytest.raises(ImageDecodeError, match=r"40x30 pixels, over the limit of 1000"):
        decode_image(data, max_pixels=1000)


def test_decode_accepts_image_exactly_at_max_pixels():
    data = _encode(_noise_image(), "PNG")
    assert decode_image(data, max_pixels=40 * 30).size == (40, 30)


# --- preprocess_image -----------------------------------------------------------------------------


def _luma(rgb: tuple[int, int, int]) -> int:
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1", "F"])
def test_preprocess_any_mode_gives_uint8_square_gray(mode):
    # Given a 40x30 image in `mode`
    image = _noise_image(mode="RGB").convert(mode)
    # When preprocessed to 32x32
    out = preprocess_image(image, PreprocessConfig(image_size=32))
    # Then the result is a uint8 gray (32, 32) array
    assert out.shape == (32, 32)
    assert out.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1", "F"])
def test_resize_image_gives_8bit_gray_or_rgb_of_the_model_size(mode):
    image = _noise_image(mode="RGB").convert(mode)
    resized = resize_image(image, PreprocessConfig(image_size=32))
    assert resized.size == (32, 32)
    assert resized.mode in ("L", "RGB")


def test_preprocess_gray_equals_one_channel_of_the_papers_rgb_copy():
    # Given a gray image, and the paper's preprocessing of it: copy to RGB, then resize
    image = _noise_image(size=(40, 30), mode="L")
    papers = np.asarray(image.convert("RGB").resize((24, 24), Image.Resampling.BILINEAR))
    # When brainray preprocesses it as one channel
    out = preprocess_image(image, PreprocessConfig(image_size=24))
    # Then it is exactly each of the three identical channels the paper feeds the model
    for channel in range(3):
        np.testing.assert_array_equal(out, papers[..., channel])
    assert out.std() > 0  # not a blank image


def test_preprocess_gray_saved_as_rgb_gives_the_same_gray():
    # Gray scans are often stored as RGB with three equal channels: luma is then exact
    gray = _noise_image(size=(24, 24), mode="L")
    config = PreprocessConfig(image_size=24)
    np.testing.assert_array_equal(preprocess_image(gray.convert("RGB"), config),
                                  preprocess_image(gray, config))


def test_preprocess_rgba_transparent_pixels_become_black():
    # Given an RGBA image: left half fully transparent white, right half opaque orange
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (255, 255, 255, 0)
    pixels[:, 4:] = (200, 100, 50, 255)
    image = Image.fromarray(pixels, mode="RGBA")
    config = PreprocessConfig(image_size=8)
    # When resized and preprocessed at its own size (no resampling)
    resized = np.asarray(resize_image(image, config))
    out = preprocess_image(image, config)
    # Then transparent pixels are black background and opaque ones keep their colour (for the
    # OOD check) and become its luma in the model's input
    assert (resized[:, :4] == 0).all() and (out[:, :4] == 0).all()
    assert (resized[:, 4:] == (200, 100, 50)).all()
    assert (out[:, 4:] == _luma((200, 100, 50))).all()


def test_preprocess_palette_with_transparency_becomes_black():
    # Given a palette image whose index 0 is declared transparent (and is white in the palette)
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 255, 255, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.putpixel((3, 3), 1)
    image.info["transparency"] = 0
    # When preprocessed
    out = preprocess_image(image, PreprocessConfig(image_size=4))
    # Then the transparent index is black and the opaque index keeps its palette colour's luma
    assert out[0, 0] == 0
    assert out[3, 3] == _luma((10, 20, 30))


def test_preprocess_palette_without_transparency_matches_rgb_conversion():
    rgb = _noise_image(size=(16, 16))
    palette = rgb.convert("P")
    out = preprocess_image(palette, PreprocessConfig(image_size=16))
    np.testing.assert_array_equal(out, np.asarray(palette.convert("RGB").convert("L")))


def test_preprocess_cmyk_converts_colours():
    # Given CMYK images of pure white (no ink) and pure red (magenta + yellow)
    white = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    red = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    config = PreprocessConfig(image_size=4)
    # When preprocessed / Then they are RGB white and red, and their gray values
    assert (preprocess_image(white, config) == 255).all()
    assert (np.asarray(resize_image(red, config)) == (255, 0, 0)).all()
    assert (preprocess_image(red, config) == _luma((255, 0, 0))).all()


def test_preprocess_16bit_stretches_own_range_to_8_bits():
    # Given a 16-bit scan using only 1000..31000 of its 0..65535 range
    values = np.linspace(1000, 31000, 64).reshape(8, 8).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    # When preprocessed at its own size
    gray = preprocess_image(image, PreprocessConfig(image_size=8)).astype(int)
    # Then the minimum maps to 0, the maximum to 255, monotonically
    assert gray.min() == 0 and gray.max() == 255
    assert gray[0, 0] == 0 and gray[-1, -1] == 255
    assert (np.diff(gray.reshape(-1)) >= 0).all()


def test_preprocess_constant_16bit_image_is_black_not_nan():
    image = Image.fromarray(np.full((6, 6), 4242, dtype=np.uint16))
    out = preprocess_image(image, PreprocessConfig(image_size=6))
    assert (out == 0).all()


def test_preprocess_one_pixel_image_fills_the_output():
    # Given a 1x1 image / When resized to 16x16 / Then every pixel has its gray value
    image = Image.new("RGB", (1, 1), (12, 34, 56))
    out = preprocess_image(image, PreprocessConfig(image_size=16))
    assert out.shape == (16, 16)
    assert (out == _luma((12, 34, 56))).all()


def test_preprocess_non_square_stretches_without_transposing():
    # Given a wide 60x20 image, bright on its left third only
    pixels = np.zeros((20, 60), dtype=np.uint8)
    pixels[:, :20] = 255
    # When preprocessed to 30x30 (aspect ratio is not kept)
    out = preprocess_image(Image.fromarray(pixels), PreprocessConfig(image_size=30))
    # Then the bright band is the left third of the columns, across all rows
    assert out.shape == (30, 30)
    assert (out[:, :8] == 255).all()
    assert (out[:, 12:] == 0).all()


def test_preprocess_bytes_matches_decode_then_preprocess():
    data = _encode(_noise_image(), "PNG")
    config = PreprocessConfig(image_size=20)
    np.testing.assert_array_equal(preprocess_bytes(data, config),
                                  preprocess_image(decode_image(data, MAX_PIXELS), config))


def test_to_8bit_applies_exif_orientation():
    # Given a 4x2 image saved with EXIF orientation 6 (display rotated 90 degrees clockwise)
    image = Image.new("L", (4, 2), 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    # When converted / Then the displayed orientation (2 wide, 4 high) is used
    assert to_8bit(decode_image(buffer.getvalue(), MAX_PIXELS)).size == (2, 4)


# --- to_model_input -------------------------------------------------------------------------------


def test_to_model_input_scales_and_permutes_to_channels_last_float():
    # Given a uint8 NHWC batch containing 0 and 255
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    # When converted
    x = to_model_input(images)
    # Then it is float32 NCHW in [0, 1], channels-last in memory, with values preserved
    assert x.dtype == torch.float32
    assert x.shape == (2, 3, 5, 7)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 128 / 255])
    torch.testing.assert_close(x, images.permute(0, 3, 1, 2).float() / 255)


def test_to_model_input_gives_gray_one_channel_with_channels_last_strides():
    images = torch.randint(0, 256, (2, 5, 7), dtype=torch.uint8)
    x = to_model_input(images)
    assert x.dtype == torch.float32 and x.shape == (2, 1, 5, 7)
    # the channel stride is 1 as in channels-last, which the first convolution keeps
    assert x.stride(1) == 1
    torch.testing.assert_close(x, images.unsqueeze(1).float() / 255)


def test_to_model_input_does_not_modify_its_input():
    images = torch.full((1, 2, 2, 3), 200, dtype=torch.uint8)
    to_model_input(images)
    assert (images == 200).all()


@pytest.mark.parametrize("bad", [
    torch.zeros((2, 5, 5, 3), dtype=torch.float32),
    torch.zeros((2, 5, 5, 3), dtype=torch.int64),
    torch.zeros((5, 5), dtype=torch.uint8),
    torch.zeros((2, 5, 5, 4), dtype=torch.uint8),
    torch.zeros((2, 3, 5, 5), dtype=torch.uint8),
], ids=["float32", "int64", "2d", "4-channels", "nchw"])
def test_to_model_input_rejects_wrong_dtype_or_shape(bad):
    with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W\) or \(N, H, W, 3\)"):
        to_model_input(bad)


# --- augmentation ---------------------------------------------------------------------------------


def test_augment_keeps_shape_and_range():
    # Given a batch including pure black and pure white images
    images = _batch(n=4)
    images[0] = 0.0
    images[1] = 1.0
    # When augmented with the strongest preset
    out = augment_batch(images, AugmentConfig.preset("paper"), torch.Generator().manual_seed(3))
    # Then shape and dtype are kept and values stay in [0, 1]
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.isfinite(out).all()


def test_augment_same_seed_is_identical_and_different_seed_differs():
    images = _batch()
    config = AugmentConfig()
    first = augment_batch(images, config, augmentation_generator(seed=1, epoch=2, rank=0))
    again = augment_batch(images, config, augmentation_generator(seed=1, epoch=2, rank=0))
    other = augment_batch(images, config, augmentation_generator(seed=2, epoch=2, rank=0))
    next_epoch = augment_batch(images, config, augmentation_generator(seed=1, epoch=3, rank=0))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, next_epoch)


def test_augment_does_not_modify_its_input():
    images = _batch()
    before = images.clone()
    augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(images, before)


def test_augment_with_neutral_config_is_identity():
    images = _batch(n=3, size=17)  # odd size: pixel centres must still line up exactly
    out = augment_batch(images, NEUTRAL, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_augment_hflip_only_equals_flip_along_width():
    config = dataclasses.replace(NEUTRAL, hflip_prob=1.0)
    images = _batch(n=2, size=12)
    out = augment_batch(images, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.flip(images, dims=[3]), atol=1e-5, rtol=0)


def test_augment_vflip_only_equals_flip_along_height():
    config = dataclasses.replace(NEUTRAL, vflip_prob=1.0)
    images = _batch(n=2, size=12)
    out = augment_batch(images, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.flip(images, dims=[2]), atol=1e-5, rtol=0)


def test_sample_affine_rotation_and_zoom_stay_within_bounds():
    # Given the paper config (rotation 30 degrees, flips, zoom 0.85..1.15)
    config = AugmentConfig(rotation_deg=30.0)
    # When many matrices are drawn
    theta = sample_affine(2000, config, torch.Generator().manual_seed(0)).double()
    assert theta.shape == (2000, 2, 3)
    # Then the angle recovered from the first column (sign fixed by a possible h-flip:
    # cos(angle) > 0 for |angle| <= 30 degrees) stays within +-30 degrees and spans most of it
    flip_x = torch.sign(theta[:, 0, 0])
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0] * flip_x, theta[:, 0, 0] * flip_x))
    assert angle.abs().max() <= 30.0 + 1e-6
    assert angle.min() < -25 and angle.max() > 25
    # and the zoom (inverse of the column norm) stays within [zoom_min, zoom_max]
    zoom = 1 / theta[:, :, 0].norm(dim=1)
    assert zoom.min() >= config.zoom_min - 1e-6 and zoom.max() <= config.zoom_max + 1e-6
    # and both flips actually occur about half the time
    assert 0.4 < (flip_x < 0).double().mean() < 0.6


def test_sample_affine_without_rotation_is_axis_aligned():
    config = dataclasses.replace(AugmentConfig(), rotation_deg=0.0)
    theta = sample_affine(50, config, torch.Generator().manual_seed(1))
    assert torch.allclose(theta[:, 0, 1], torch.zeros(50), atol=1e-7)
    assert torch.allclose(theta[:, 1, 0], torch.zeros(50), atol=1e-7)
    assert (theta[:, :, 2].abs() <= 2 * config.translate_fraction + 1e-7).all()


def test_augment_rotation_keeps_centre_pixel():
    # Given a bright centre on black and rotation only / When augmented / Then the centre stays
    images = torch.zeros((4, 3, 21, 21))
    images[:, :, 10, 10] = 1.0
    config = dataclasses.replace(NEUTRAL, rotation_deg=30.0)
    out = augment_batch(images, config, torch.Generator().manual_seed(5))
    assert torch.allclose(out[:, :, 10, 10], torch.ones(4, 3), atol=1e-5)


def test_augment_brightness_only_scales_pixels():
    config = dataclasses.replace(NEUTRAL, brightness=0.5)
    images = torch.full((8, 3, 4, 4), 0.4)
    out = augment_batch(images, config, torch.Generator().manual_seed(0))
    factors = out[:, 0, 0, 0] / 0.4
    assert ((factors >= 0.5 - 1e-5) & (factors <= 1.5 + 1e-5)).all()
    assert factors.std() > 0.05  # differs per image
    assert torch.allclose(out, (0.4 * factors).view(8, 1, 1, 1).expand_as(out), atol=1e-5)


def test_augment_brightness_then_contrast_matches_the_two_step_definition():
    """The fused multiply-add equals brightness, then contrast about the brightened mean."""
    config = dataclasses.replace(NEUTRAL, brightness=0.3, contrast=0.4)
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = augment_batch(images, config, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    sample_affine(6, config, draws)  # the same draws, in the same order, as augment_batch
    brightness = (0.7 + 0.6 * torch.rand(6, generator=draws)).view(6, 1, 1, 1)
    contrast = (0.6 + 0.8 * torch.rand(6, generator=draws)).view(6, 1, 1, 1)
    bright = images * brightness
    mean = bright.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, ((bright - mean) * contrast + mean).clamp(0, 1),
                               atol=1e-5, rtol=0)


def test_augment_preset_levels():
    assert AugmentConfig.preset("none") is None
    assert AugmentConfig.preset("paper") == AugmentConfig()
    paper, light = AugmentConfig.preset("paper"), AugmentConfig.preset("light")
    assert paper.rotation_deg == 30.0 and paper.hflip_prob == 0.5 and paper.vflip_prob == 0.5
    assert light.rotation_deg < paper.rotation_deg
    assert light.vflip_prob == 0.0
    assert light.zoom_max - light.zoom_min < paper.zoom_max - paper.zoom_min
    assert light.brightness < paper.brightness and light.contrast < paper.contrast
    with pytest.raises(ValueError, match="unknown augmentation level"):
        AugmentConfig.preset("heavy")


def test_augmentation_generator_streams_depend_on_seed_epoch_rank():
    def draw(seed, epoch, rank):
        return torch.rand(4, generator=augmentation_generator(seed, epoch, rank))

    assert torch.equal(draw(0, 1, 0), draw(0, 1, 0))
    assert not torch.equal(draw(0, 1, 0), draw(0, 1, 1))
    assert not torch.equal(draw(0, 1, 0), draw(0, 2, 0))
    assert not math.isclose(draw(0, 1, 0)[0].item(), draw(1, 1, 0)[0].item())
