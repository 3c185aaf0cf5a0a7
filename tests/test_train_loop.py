"""Tests for brainray.train_loop's pieces: schedules, EMA, loss scaler restore, one epoch's loss.

The loop's functions run here outside Ray Train, with a stand-in train context and a shard
that yields numpy batches as Ray Data's `iter_batches` does.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from brainray import train_loop as train
from brainray.config import AugmentConfig, PreprocessConfig, TrainConfig, to_dict
from brainray.model import build_model
from brainray.presets import TrainPreset

STEPS = 10


def _loop(**overrides) -> dict:
    config = to_dict(TrainConfig(data="d", run_dir="r", **overrides))
    preprocess = PreprocessConfig(**config["preprocess"])
    return {**config, "steps_per_epoch": STEPS, "preset": TrainPreset(preprocess)}


@pytest.fixture
def single_worker(monkeypatch):
    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1,
                              get_local_world_size=lambda: 1)
    monkeypatch.setattr(train.ray.train, "get_context", lambda: context)


class _Shard:
    """Fixed batches of uint8 gray images and labels, in order."""

    def __init__(self, n: int = 16, size: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        self.labels = rng.integers(0, 4, n)

    def iter_batches(self, batch_size: int, **kwargs):
        for start in range(0, len(self.labels), batch_size):
            yield {"image": self.images[start:start + batch_size],
                   "label": self.labels[start:start + batch_size]}


# --- learning-rate schedules ------------------------------------------------------------------


def test_cosine_warms_up_linearly_then_decays_to_zero():
    loop = _loop(epochs=3, warmup_epochs=1, lr_schedule="cosine")
    factors = [train.lr_factor(step, STEPS, loop) for step in range(3 * STEPS)]
    assert factors[:STEPS] == pytest.approx([(s + 1) / STEPS for s in range(STEPS)])
    assert factors[STEPS] == pytest.approx(1.0)
    assert factors[2 * STEPS] == pytest.approx(0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(factors[STEPS:], factors[STEPS + 1:], strict=False))


def test_constant_schedule_stays_at_the_peak_after_warm_up():
    loop = _loop(epochs=3, warmup_epochs=0, lr_schedule="constant")
    assert [train.lr_factor(step, STEPS, loop) for step in range(30)] == [1.0] * 30


def test_onecycle_rises_over_the_first_quarter_then_falls_far_below_its_start():
    loop = _loop(epochs=4, lr_schedule="onecycle")
    total = 4 * STEPS
    factors = [train.lr_factor(step, STEPS, loop) for step in range(total + 1)]
    peak = factors.index(max(factors))
    assert factors[0] == pytest.approx(train.ONECYCLE_START)
    assert peak == round(train.ONECYCLE_WARM_FRACTION * total) and factors[peak] == 1.0
    assert factors[-1] == pytest.approx(train.ONECYCLE_END)


def test_the_scheduler_follows_lr_factor_and_resumes_where_it_stopped():
    # Given a schedule stepped 13 times and saved with its optimizer
    loop = _loop(epochs=3, warmup_epochs=1, lr_schedule="cosine", lr=1e-2)
    model = torch.nn.Linear(2, 2)
    optimizer = train.make_optimizer(model, loop["lr"], 0.0, torch.device("cpu"))
    scheduler = train.make_scheduler(optimizer, loop)
    seen = []
    for _ in range(13):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    # When new ones are built and loaded from the saved state (a relaunch)
    optimizer2 = train.make_optimizer(model, loop["lr"], 0.0, torch.device("cpu"))
    scheduler2 = train.make_scheduler(optimizer2, loop)
    optimizer2.load_state_dict(saved[0])
    scheduler2.load_state_dict(saved[1])
    # Then every rate so far was lr x lr_factor, and the next one continues the sequence
    assert seen == pytest.approx([1e-2 * train.lr_factor(s, STEPS, loop) for s in range(13)])
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(
        1e-2 * train.lr_factor(13, STEPS, loop))


def test_adamw_decouples_weight_decay_and_adam_does_not():
    model = torch.nn.Linear(2, 2)
    adamw = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), kind="adamw")
    adam = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"))
    assert type(adamw) is torch.optim.AdamW and type(adam) is torch.optim.Adam


# --- exponential moving average -------------------------------------------------------------------


def test_no_ema_when_decay_is_zero():
    assert train.make_ema(torch.nn.Linear(2, 2), 0.0) is None


def test_ema_averages_weights_with_the_decay_after_warm_up():
    # Given an EMA of a one-weight model, past warm-up
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = train.make_ema(model, 0.9)
    train.update_ema(ema, model, epoch=1, warmup_epochs=1)  # first update copies the weights
    # When the weight moves to 2 and the average is updated once
    with torch.no_grad():
        model.weight.fill_(2.0)
    train.update_ema(ema, model, epoch=1, warmup_epochs=1)
    # Then the average moved a tenth of the way
    assert ema.module.weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)


def test_ema_follows_the_weights_exactly_during_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = train.make_ema(model, 0.9)
    for value in (1.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        train.update_ema(ema, model, epoch=0, warmup_epochs=1)
        assert ema.module.weight.item() == pytest.approx(value)


def test_ema_also_averages_batchnorm_statistics():
    model = build_model("bn_cnn", 4, 32)
    ema = train.make_ema(model, 0.5)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 1, 32, 32) + 3.0)  # moves the running means
    train.update_ema(ema, model, epoch=1, warmup_epochs=0)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ema_bn = next(m for m in ema.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(ema_bn.running_mean, bn.running_mean)


# --- loss scaler across precisions ----------------------------------------------------------------


def test_fp16_relaunch_of_an_fp32_run_starts_a_fresh_scaler(single_worker, capsys):
    # Given a scaler that is enabled now (fp16), and the state of a disabled one (fp32 run)
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    # When it is restored, Then it keeps its fresh state and says so (no "empty state" error)
    train._restore_scaler(enabled, saved)
    assert enabled.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()
    assert "fresh loss scaler" in capsys.readouterr().out


def test_fp32_relaunch_of_an_fp16_run_ignores_the_old_scaler(single_worker, capsys):
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    train._restore_scaler(disabled, saved)
    assert not disabled.is_enabled()
    assert "fresh loss scaler" in capsys.readouterr().out


def test_same_precision_relaunch_restores_the_scale(single_worker, capsys):
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    train._restore_scaler(scaler, saved)
    assert scaler.get_scale() == 8.0
    assert capsys.readouterr().out == ""


# --- one epoch ------------------------------------------------------------------------------------


def _one_epoch(label_smoothing: float, ema_decay: float = 0.0) -> tuple[dict, object]:
    torch.manual_seed(0)
    model = build_model("bn_cnn", 4, 16).to(memory_format=torch.channels_last)
    loop = {**_loop(lr=1e-9, label_smoothing=label_smoothing, ema_decay=ema_decay,
                    warmup_epochs=0), "precision": "fp32", "batch_size_per_worker": 8}
    optimizer = train.make_optimizer(model, loop["lr"], 0.0, torch.device("cpu"))
    ema = train.make_ema(model, ema_decay)
    metrics = train.train_one_epoch(
        model, optimizer, train.make_scheduler(optimizer, loop),
        torch.amp.GradScaler("cpu", enabled=False), ema, _Shard(), loop, 0, torch.device("cpu"))
    return metrics, ema


def test_label_smoothing_enters_the_training_loss(single_worker):
    # Given the same model, data and a learning rate too small to change anything
    plain, _ = _one_epoch(label_smoothing=0.0)
    smoothed, _ = _one_epoch(label_smoothing=0.5)
    # Then only the smoothed loss differs (cross-entropy against softened targets)
    assert plain["train_images"] == smoothed["train_images"] == 16
    assert plain["train_accuracy"] == smoothed["train_accuracy"]
    assert not math.isclose(plain["train_loss"], smoothed["train_loss"], rel_tol=1e-3)


def test_an_epoch_updates_the_ema_once_per_step(single_worker):
    _, ema = _one_epoch(label_smoothing=0.0, ema_decay=0.9)
    assert int(ema.n_averaged) == 2  # 16 images in batches of 8


def test_augment_config_reaches_the_training_input():
    loop = {**_loop(), "preset": TrainPreset(PreprocessConfig(8), AugmentConfig.preset("paper"))}
    batch = {"image": np.full((2, 8, 8), 128, np.uint8), "label": np.array([0, 1])}
    x, _ = train._training_input(batch, loop, torch.Generator().manual_seed(0),
                                 torch.device("cpu"))
    assert not torch.allclose(x, torch.full_like(x, 128 / 255))
