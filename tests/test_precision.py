"""Tests for brainray.precision: what "auto" resolves to and how each setting is applied."""

from __future__ import annotations

import pytest
import torch

from brainray import precision
from brainray.config import PRECISIONS
from brainray.model import build_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only compared, never allocated on


@pytest.mark.parametrize("native_bf16, training, expected", [
    (True, True, "bf16-stem"), (True, False, "fp32"), (False, True, "fp32"),
    (False, False, "fp32")])
def test_auto_on_cpu_uses_the_bf16_stem_only_to_train_on_native_bf16(
        monkeypatch, native_bf16, training, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    assert precision.resolve("auto", CPU, training=training) == expected


@pytest.mark.parametrize("training", [True, False])
def test_auto_on_gpu_is_fp16(training):
    assert precision.resolve("auto", CUDA, training=training) == "fp16"


@pytest.mark.parametrize("name", [p for p in PRECISIONS if p != "auto"])
def test_explicit_precisions_are_kept(name):
    for device in (CPU, CUDA):
        assert precision.resolve(name, device, training=True) == name


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("int8", CPU, training=True)


@pytest.mark.parametrize("name, stem", [("bf16-stem", True), ("fp32", False), ("bf16", False)])
def test_prepare_sets_the_first_block_and_reports_what_it_chose(name, stem):
    model = build_model("paper_cnn", 4, image_size=32)
    model.bf16_stem = not stem
    assert precision.prepare(model, CPU, name, training=True) == name
    assert model.bf16_stem is stem


def test_prepare_reaches_through_a_ddp_style_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = build_model("paper_cnn", 4, image_size=32)
    precision.prepare(Wrapper(model), CPU, "bf16-stem", training=True)
    assert model.bf16_stem is True


@pytest.mark.parametrize("name, enabled", [
    ("fp32", False), ("bf16-stem", False), ("auto", False), ("bf16", True), ("fp16", True)])
def test_whole_model_autocast_on_cpu(name, enabled):
    with precision.autocast_for(CPU, name):
        out = torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3))
    assert out.dtype == (torch.bfloat16 if enabled else torch.float32)


def test_a_model_without_a_bf16_first_block_runs_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    model = build_model("bn_cnn", 4, image_size=32)
    for name in ("auto", "bf16-stem"):
        assert precision.prepare(model, CPU, name, training=True) == "fp32"
        assert model.bf16_stem is False
