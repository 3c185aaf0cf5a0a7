"""Tests for brainray.precision: what "auto" resolves to and how each setting is applied."""

from __future__ import annotations

import pytest
import torch

from brainray import precision
from brainray.config import PRECISIONS
from brainray.model import build_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only compared, never allocated on


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_is_exact_fp32_on_cpu_even_where_bf16_is_native(monkeypatch, native_bf16):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    assert precision.effective_precision("auto", CPU) == "fp32"
    model = build_model("paper_cnn", 4, image_size=32)
    assert precision.prepare(model, CPU, "auto") == "fp32"
    assert model.bf16_stem is False


def test_auto_on_gpu_is_fp16():
    assert precision.effective_precision("auto", CUDA) == "fp16"


@pytest.mark.parametrize("name", [p for p in PRECISIONS if p != "auto"])
def test_explicit_precisions_are_kept(name):
    for device in (CPU, CUDA):
        assert precision.effective_precision(name, device) == name


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.effective_precision("int8", CPU)


@pytest.mark.parametrize("name, stem", [("bf16-stem", True), ("fp32", False), ("bf16", False)])
def test_prepare_sets_the_first_block_and_reports_what_it_chose(name, stem):
    model = build_model("paper_cnn", 4, image_size=32)
    model.bf16_stem = not stem
    assert precision.prepare(model, CPU, name) == name
    assert model.bf16_stem is stem


def test_prepare_reaches_through_a_ddp_style_wrapper():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = build_model("paper_cnn", 4, image_size=32)
    precision.prepare(Wrapper(model), CPU, "bf16-stem")
    assert model.bf16_stem is True


@pytest.mark.parametrize("name, enabled", [
    ("fp32", False), ("bf16-stem", False), ("auto", False), ("bf16", True), ("fp16", True)])
def test_whole_model_autocast_on_cpu(name, enabled):
    with precision.autocast_for(CPU, name):
        out = torch.nn.functional.linear(torch.rand(2, 3), torch.rand(4, 3))
    assert out.dtype == (torch.bfloat16 if enabled else torch.float32)


def test_a_model_without_a_bf16_first_block_runs_fp32():
    model = build_model("bn_cnn", 4, image_size=32)
    for name in ("auto", "bf16-stem"):
        assert precision.prepare(model, CPU, name) == "fp32"
        assert model.bf16_stem is False
