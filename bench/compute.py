"""(1) The model's compute limit: train-step and inference images/s on pre-decoded tensors.

    python -m bench.compute [--model paper_cnn] [--seconds 15]

"naive" is the paper's network as usually written (conv, ReLU, max-pool; NCHW fp32; the default
Adam) on gray images copied to RGB. "brainray" is the same function as brainray trains it: the
gray channel convolved with the first layer's weights summed over RGB (identical outputs), max-pool
before ReLU (identical outputs, less memory traffic), channels-last, fused Adam, and the fastest
precision measured here (bf16 autocast on CPUs with native bf16, fp16/bf16 AMP on GPU), with
glibc's allocator set up as brainray sets it up for its Ray workers (`brainray.runtime_env`).
The two are started from the same weights and trained on the same batches in fp32; the largest
logit difference afterwards shows they compute the same thing. The opt-in bf16-stem setting (bf16
on the first block only, `brainray.precision`) is measured and reported beside them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
from torch import nn

from bench.common import rate_for, ratio
from brainray.model import build_model
from brainray.precision import autocast_for, cpu_has_native_bf16, prepare
from brainray.runtime_env import tune_this_process
from brainray.train_loop import make_optimizer
from brainray.transforms import to_model_input


class NaivePaperCNN(nn.Module):
    """The paper's CNN the way it is usually written: conv, ReLU, pool (same parameter names)."""

    def __init__(self, num_classes: int = 4, image_size: int = 224):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise([3, 32, 64, 128]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * side * side, 128), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _naive_model(name: str) -> nn.Module:
    return NaivePaperCNN() if name == "paper_cnn" else build_model(name, 4)


def _batch(batch_size: int, device: torch.device):
    """The same gray images twice: copied to RGB in NCHW (naive), and as one channel (brainray)."""
    generator = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (batch_size, 224, 224), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, 4, (batch_size,), generator=generator).to(device)
    one_channel = to_model_input(gray.to(device))
    return one_channel.repeat(1, 3, 1, 1), one_channel, y  # repeat's copy is NCHW-contiguous


def _train_step(model, optimizer, x, y, device, precision, scaler=None):
    def step() -> int:
        with autocast_for(device, precision):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return len(y)
    return step


def _infer_step(model, x, device, precision):
    def step() -> int:
        with torch.inference_mode(), autocast_for(device, precision):
            model(x).float().softmax(1)
        return len(x)
    return step


def _precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "fp16", "bf16"]
    return ["fp32", "bf16", "bf16-stem"] if cpu_has_native_bf16() else ["fp32"]


def measure(model_name: str, batch_size: int, seconds: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    naive = _naive_model(model_name).to(device)
    fast = build_model(model_name, 4)
    fast.load_state_dict(naive.state_dict())
    fast = fast.to(device, memory_format=torch.channels_last)
    naive_opt = torch.optim.Adam(naive.parameters(), lr=1e-4)
    fast_opt = make_optimizer(fast, 1e-4, 0.0, device)
    x, x_gray, y = _batch(batch_size, device)

    # Same weights, same batches, a few steps each: how far apart do the two computations end up?
    for step in range(3):
        torch.manual_seed(step)  # the same dropout masks for both
        _train_step(naive, naive_opt, x, y, device, "fp32")()
        torch.manual_seed(step)
        _train_step(fast, fast_opt, x_gray, y, device, "fp32")()
    naive.eval()
    fast.eval()
    with torch.inference_mode():
        max_logit_diff = (naive(x) - fast(x_gray)).abs().max().item()
    naive.train()
    fast.train()

    result: dict = {"model": model_name, "device": str(device), "batch_size": batch_size,
                    "threads": torch.get_num_threads(),
                    "max_logit_difference_after_3_steps_fp32": max_logit_diff}
    result["naive_fp32_nchw_train_images_per_s"] = round(rate_for(
        seconds, _train_step(naive, naive_opt, x, y, device, "fp32")), 1)
    naive.eval()
    result["naive_fp32_nchw_infer_images_per_s"] = round(rate_for(
        seconds, _infer_step(naive, x, device, "fp32")), 1)
    result["allocator_tuned"] = tune_this_process()  # what brainray's Ray workers get
    for precision in _precisions(device):
        scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "fp16"
                  else None)
        prepare(fast, device, precision)
        fast.train()
        result[f"brainray_{precision}_train_images_per_s"] = round(rate_for(
            seconds, _train_step(fast, fast_opt, x_gray, y, device, precision, scaler)), 1)
        fast.eval()
        result[f"brainray_{precision}_infer_images_per_s"] = round(rate_for(
            seconds, _infer_step(fast, x_gray, device, precision)), 1)
    # bf16-stem is opt-in (its losses came out higher in paired training runs; README) and
    # scoring never runs it: reported beside the others, but not a candidate for "fastest".
    candidates = [p for p in _precisions(device) if p != "bf16-stem"]
    for kind in ("train", "infer"):
        best = max(candidates, key=lambda p: result[f"brainray_{p}_{kind}_images_per_s"])
        result[f"fastest_{kind}_precision"] = best
        result[f"fastest_{kind}_images_per_s"] = result[f"brainray_{best}_{kind}_images_per_s"]
        result[f"fastest_vs_naive_{kind}"] = ratio(result[f"fastest_{kind}_images_per_s"],
                                                   result[f"naive_fp32_nchw_{kind}_images_per_s"])
    if "brainray_bf16-stem_train_images_per_s" in result:
        result["bf16_stem_vs_naive_train"] = ratio(result["brainray_bf16-stem_train_images_per_s"],
                                                   result["naive_fp32_nchw_train_images_per_s"])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paper_cnn", choices=["paper_cnn", "bn_cnn"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure(args.model, args.batch_size, args.seconds, device)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
