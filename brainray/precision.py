"""Numeric precision: what "auto" means where the model runs, and how each setting is applied.

- fp32: everything in fp32.
- fp16 / bf16: autocast over the whole model (AMP). On CPU both mean bf16 autocast.
- bf16-stem: autocast over the model's first block only (paper_cnn's first convolution, its
  pooling and activation); everything after runs in fp32. Models without such a block (bn_cnn,
  where it measured no faster) run fp32. On CPUs with native bf16 instructions that block's
  convolution is ~2x faster in bf16 and its output, the largest tensor of the step, half the
  memory traffic, while the deeper convolutions are slower in bf16 than in fp32 (bench/).

"auto" is fp16 AMP on GPU and fp32 on CPU. bf16-stem trains paper_cnn about 5% faster on CPU, but
in two paired runs its validation and test losses came out 4-11% higher (README, Performance), so
it is opt-in rather than the default.
"""

from __future__ import annotations

import torch
from torch import nn

from brainray.config import PRECISIONS
from brainray.model import unwrap


def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bf16 dot products (AVX-512 BF16); without them oneDNN emulates
    bf16, slower than fp32. torch exposes no public check, so this tolerates the private one
    disappearing."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check is not None and check())


def effective_precision(precision: str, device: torch.device, *, has_stem: bool = True) -> str:
    """The concrete precision ("fp32", "fp16", "bf16" or "bf16-stem") that `precision` means
    for a model with (`has_stem`) or without a first block that bf16 speeds up."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "bf16-stem" and not has_stem:
        return "fp32"
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def prepare(model: nn.Module, device: torch.device, precision: str) -> str:
    """Resolve `precision` and set the model's first block to match; returns what it resolved to.

    The first block's precision is a plain attribute, not a parameter or buffer, so checkpoints
    are the same whichever precision trained or loads them.
    """
    network = unwrap(model)
    has_stem = getattr(network, "stem_layers", 0) > 0
    resolved = effective_precision(precision, device, has_stem=has_stem)
    network.bf16_stem = resolved == "bf16-stem"
    return resolved


def autocast_for(device: torch.device, precision: str = "auto"):
    """The whole-model autocast context: on for fp16/bf16 (and "auto" on GPU), off otherwise.

    bf16-stem needs no context here: the model applies it to its first block (`prepare`).
    """
    precision = effective_precision(precision, device)
    enabled = precision in ("fp16", "bf16")
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype, enabled=enabled)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
