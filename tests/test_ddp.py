"""DDP correctness on the shared local Ray cluster: 2 workers learn what 1 worker learns, and
each rank draws its own dropout and augmentation randomness."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray.train
import torch
from ray.train.torch import TorchTrainer

from brainray import train_loop
from brainray.config import PreprocessConfig, TrainConfig, to_dict
from brainray.model import unwrap
from brainray.transforms import augmentation_generator, to_model_input

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODELS = ("paper_cnn", "bn_cnn")
BATCH = 8  # the global batch of the one step
SIZE = 32


def _loop(model: str) -> dict:
    config = TrainConfig(data="d", run_dir="r", model=model, lr=1e-3, warmup_epochs=0,
                         lr_schedule="constant", preprocess=PreprocessConfig(image_size=SIZE))
    return {**to_dict(config), "architecture": {}, "initial_weights": None,
            "initial_weights_source": None, "steps_per_epoch": 1, "events": None}


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (BATCH, SIZE, SIZE), dtype=np.uint8))
    return to_model_input(images), torch.from_numpy(rng.integers(0, 4, BATCH))


def _one_step(config: dict) -> None:
    """Per worker: build as the loop does, take this rank's share of the batch with dropout off,
    one optimizer step; rank 0 saves the weights. `halves` makes one worker pass the batch as
    that many separate forward passes (what DDP's per-worker BatchNorm statistics amount to)."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    for name in MODELS:
        trainable = train_loop._build(_loop(name), torch.device("cpu"))
        model = trainable.model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        initial = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
        x, y = _global_batch()
        share = BATCH // world
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        parts = list(zip(x.chunk(config["halves"]), y.chunk(config["halves"]), strict=True))
        trainable.optimizer.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(model(xp), yp) for xp, yp in parts)
        (loss / len(parts)).backward()
        grads = {k: v.grad.detach().clone() for k, v in unwrap(model).named_parameters()}
        trainable.optimizer.step()
        if rank == 0:
            weights = {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}
            torch.save({"initial": initial, "grads": grads, "after": weights},
                       os.path.join(config["out"], f"{name}-{world}.pt"))


def _fit(loop, workers: int, config: dict) -> None:
    TorchTrainer(loop, train_loop_config=config,
                 scaling_config=ray.train.ScalingConfig(
                     num_workers=workers, resources_per_worker={"CPU": 0.5})).fit()


def _draw(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    trainable = train_loop._build(_loop("paper_cnn"), torch.device("cpu"))
    mask = torch.nn.functional.dropout(torch.ones(256), 0.5, training=True) > 0
    augment = torch.rand(8, generator=augmentation_generator(0, 0, rank))
    first_weight = next(unwrap(trainable.model).parameters()).detach().flatten()[:8]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
        "mask": mask.tolist(), "augment": augment.tolist(), "weight": first_weight.tolist()}))


def _two_worker_probes(config: dict) -> None:
    _one_step(config)
    _draw(config)


@pytest.fixture(scope="module")
def two_workers(ray_cluster, tmp_path_factory) -> Path:
    """The folder where one 2-worker fit left its one-step weights and each rank's draws (a
    worker group costs ~20 s to start: one serves both tests)."""
    out = tmp_path_factory.mktemp("ddp")
    _fit(_two_worker_probes, 2, {"out": str(out), "halves": 1})
    return out


def test_two_workers_at_half_the_batch_take_the_step_of_one_worker(two_workers):
    # Given the same initial weights and global batch, dropout and augmentation off
    # When 2 workers take one step at batch B/2 each (fixture), and 1 worker one step at
    # batch B (bn_cnn: as two forward passes of B/2, since each DDP worker normalises its own
    # half; SyncBatchNorm has no CPU kernel)
    _fit(_one_step, 1, {"out": str(two_workers), "halves": 2})
    # Then the (all-reduced) gradients and the weights after the step agree to float
    # tolerance, for both models. Adam's first step is about lr x sign(gradient), so the
    # gradients are what shows a wrong reduction (a sum instead of a mean, a missed rank).
    errors, grad_errors = {}, {}
    for name in MODELS:
        ddp = torch.load(two_workers / f"{name}-2.pt", weights_only=True)
        single = torch.load(two_workers / f"{name}-1.pt", weights_only=True)
        after = ddp["after"]
        errors[name] = max((after[k] - single["after"][k]).abs().max().item() for k in after)
        grad_errors[name] = max(((ddp["grads"][k] - single["grads"][k]).abs().max()
                                 / single["grads"][k].abs().max().clamp_min(1e-12)).item()
                                for k in after)
        assert all(torch.equal(ddp["initial"][k], single["initial"][k]) for k in after)
        moved = max((after[k] - ddp["initial"][k]).abs().max().item() for k in after)
        assert moved > 1e-4, name  # the step did change the weights
    print(f"DDP equivalence after one step: max weight difference {errors}, max relative "
          f"gradient difference {grad_errors}")
    assert all(error < 1e-6 for error in errors.values()), errors
    assert all(error < 1e-5 for error in grad_errors.values()), grad_errors


def test_each_rank_draws_its_own_dropout_and_augmentation(two_workers):
    # Given each rank's draws in one 2-worker fit (fixture)
    ranks = [json.loads((two_workers / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Then both ranks hold one model but draw their own dropout masks and augmentation
    assert ranks[0]["weight"] == ranks[1]["weight"]  # one model, the same initial weights
    assert ranks[0]["mask"] != ranks[1]["mask"]
    assert ranks[0]["augment"] != ranks[1]["augment"]
