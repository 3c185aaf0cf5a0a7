"""The Ray Train loop: DDP training of one model, early stopping, resumable checkpoints.

`train_loop_per_worker` runs on every worker; the driver side (data, trainer, report) is in
`brainray.train_job`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from brainray.config import COL_IMAGE, COL_LABEL, AugmentConfig, PreprocessConfig
from brainray.model import build_model, count_parameters, make_checkpoint, serialize, unwrap
from brainray.precision import autocast_for, prepare
from brainray.transforms import augment_batch, augmentation_generator, to_model_input

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
PROGRESS_INTERVAL_S = 30.0


@dataclass
class LoopState:
    """What a resumed run needs besides weights and optimizer: where it was and how it went."""

    next_epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_at_epochs: list[int] = field(default_factory=list)  # after relaunches and failures


def update_early_stopping(state: LoopState, val_loss: float, epoch: int, patience: int) -> bool:
    """Track the best validation loss; True once it has not improved for `patience` epochs."""
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.epochs_since_best = val_loss, epoch, 0
    else:
        state.epochs_since_best += 1
    return state.epochs_since_best >= patience


def print0(message: str) -> None:
    """Print once, from rank 0. Bypasses Ray Train's patched `print`, which echoes every line
    twice (to its logger and to the captured stdout) on the driver."""
    if ray.train.get_context().get_world_rank() == 0:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def lr_factor(step: int, steps_per_epoch: int, config: dict) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay to zero (or constant)."""
    warmup = config["warmup_epochs"] * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config["lr_schedule"] == "constant":
        return 1.0
    total = max(1, config["epochs"] * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """Adam with the fused kernel where PyTorch has one (CPU and CUDA): the same update rule,
    one pass over the 12.9M parameters instead of a chain of elementwise ops (~12% of a paper_cnn
    step on 2 CPU cores)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                            fused=fused or None)


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _to_device(batch: dict[str, np.ndarray], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and int64 labels of a numpy batch, on the device; other columns (the path)
    ride along in the split datasets for evaluation and are ignored here."""
    images = torch.from_numpy(np.ascontiguousarray(batch[COL_IMAGE]))
    labels = torch.from_numpy(np.array(batch[COL_LABEL], dtype=np.int64))  # writable copy
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def train_one_epoch(model, optimizer, scaler, shard, loop: dict, epoch: int, state: LoopState,
                    device: torch.device) -> dict:
    model.train()
    rank = ray.train.get_context().get_world_rank()
    generator = augmentation_generator(loop["seed"], epoch, rank)
    augment: AugmentConfig | None = loop["augment_config"]
    # Sums stay on the device: a .item() per step would stall a GPU's queue every batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, input_wait = 0, 0.0
    started = last_print = time.perf_counter()
    batches = iter(shard.iter_batches(
        batch_size=loop["batch_size_per_worker"], batch_format="numpy", prefetch_batches=2,
        local_shuffle_buffer_size=loop["shuffle_buffer_images"],
        local_shuffle_seed=loop["seed"] * 1_000_003 + epoch * 1_009 + rank))
    while True:
        waited_from = time.perf_counter()
        batch = next(batches, None)
        input_wait += time.perf_counter() - waited_from  # time the model sat idle for data
        if batch is None:
            break
        images, y = _to_device(batch, device)
        x = to_model_input(images)
        if augment is not None:
            x = augment_batch(x, augment, generator).contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = loop["lr"] * lr_factor(loop["step"], loop["steps_per_epoch"], loop)
        with autocast_for(device, loop["precision"]):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loop["step"] += 1
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        now = time.perf_counter()
        if now - last_print > PROGRESS_INTERVAL_S:
            print0(f"  epoch {epoch + 1}: {seen} images, loss {loss_sum.item() / seen:.4f}, "
                   f"{seen / (now - started):.1f} img/s on this worker")
            last_print = now
    elapsed = time.perf_counter() - started
    loss_sum, correct, seen, input_wait = _all_reduce_sums(
        [loss_sum.item(), correct.item(), seen, input_wait], device)
    world = ray.train.get_context().get_world_size()
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_images": int(seen), "train_seconds": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9),
            "input_wait_fraction": input_wait / world / max(elapsed, 1e-9)}


def evaluate_epoch(model, val_iterator, loop: dict, device: torch.device) -> dict:
    """Exact validation loss and accuracy: each worker takes every world_size-th batch of all."""
    model.eval()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loss_sum, correct, seen = 0.0, 0, 0
    batches = val_iterator.iter_batches(batch_size=loop["batch_size_per_worker"] * 2,
                                        batch_format="numpy")
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            if i % world != rank:
                continue
            images, y = _to_device(batch, device)
            with autocast_for(device, loop["precision"]):
                logits = unwrap(model)(to_model_input(images))
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
    loss_sum, correct, seen = _all_reduce_sums([loss_sum, correct, seen], device)
    return {"val_loss": loss_sum / max(seen, 1), "val_accuracy": correct / max(seen, 1),
            "val_images": int(seen)}


def _restore(model, optimizer, scaler, loop: dict) -> LoopState:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as directory:
        weights = torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu",
                             weights_only=True)
        state = torch.load(os.path.join(directory, TRAIN_STATE_FILE), map_location="cpu",
                           weights_only=True)
    unwrap(model).load_state_dict(weights["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    loop["step"] = state["step"]
    restored = LoopState(**state["loop_state"])
    restored.resumed_at_epochs.append(restored.next_epoch + 1)
    print0(f"resuming from the checkpoint of epoch {restored.next_epoch} "
           f"(best val loss {restored.best_val_loss:.4f} at epoch {restored.best_epoch + 1})")
    return restored


def _report(model, optimizer, scaler, loop: dict, state: LoopState, metrics: dict) -> None:
    """Report metrics from every worker (a barrier) and a checkpoint from rank 0."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        payload = make_checkpoint(model, model_name=loop["model"], classes=loop["classes"],
                                  preprocess=loop["preprocess_config"], config=loop["config"],
                                  metrics=metrics, epoch=metrics["epoch"])
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(serialize(payload))
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "step": loop["step"], "loop_state": asdict(state)},
                   os.path.join(directory, TRAIN_STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _format_epoch(metrics: dict, epochs: int, eta_s: float) -> str:
    return (f"epoch {metrics['epoch']}/{epochs}  "
            f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f}  |  "
            f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.4f}  |  "
            f"{metrics['images_per_s']:.1f} img/s (waiting for data "
            f"{metrics['input_wait_fraction']:.0%})  lr {metrics['lr']:.2e}  "
            f"ETA {eta_s / 60:.1f} min (at most)")


def _thread_count(loop: dict) -> int:
    """Explicit --torch-threads, else this node's cores split among the workers placed on it.

    Ray reserves `cpus_per_worker` for scheduling, but a worker that is alone on a node can use
    every core while Ray Data tasks (light once images are cached) fit in between.
    """
    if loop["torch_threads"] > 0:
        return loop["torch_threads"]
    local_workers = max(1, ray.train.get_context().get_local_world_size())
    return max(int(loop["cpus_per_worker"]), (os.cpu_count() or 1) // local_workers, 1)


def train_loop_per_worker(loop: dict) -> None:
    """Build model and optimizer, resume if a checkpoint exists, train epochs, early-stop."""
    torch.manual_seed(loop["seed"])
    torch.set_num_threads(_thread_count(loop))
    device = ray.train.torch.get_device()
    loop = dict(loop, step=0, augment_config=AugmentConfig.preset(loop["augment"]),
                preprocess_config=PreprocessConfig(**loop["preprocess"]))
    model = build_model(loop["model"], len(loop["classes"]), loop["preprocess"]["image_size"])
    precision = prepare(model, device, loop["precision"])
    print0(f"model {loop['model']}: {count_parameters(model):,} parameters, precision "
           f"{precision}" + (" (auto)" if loop["precision"] == "auto" else ""))
    loop["precision"] = precision
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = make_optimizer(model, loop["lr"], loop["weight_decay"], device)
    # Loss scaling only matters for fp16 on GPU; elsewhere the scaler is a no-op passthrough.
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=device.type == "cuda" and precision == "fp16")
    state = _restore(model, optimizer, scaler, loop)
    train_shard = ray.train.get_dataset_shard("train")
    val_iterator = ray.train.get_dataset_shard("val")
    world = ray.train.get_context().get_world_size()
    loop["steps_per_epoch"] = max(1, math.ceil(
        loop["n_train"] / (loop["batch_size_per_worker"] * world)))
    if state.epochs_since_best >= loop["patience"]:
        print0(f"run already stopped early at epoch {state.next_epoch}; nothing to train")
        return
    epoch_seconds: list[float] = []
    for epoch in range(state.next_epoch, loop["epochs"]):
        started = time.perf_counter()
        metrics = {"epoch": epoch + 1, "precision": precision,
                   **train_one_epoch(model, optimizer, scaler, train_shard, loop, epoch, state,
                                     device)}
        metrics.update(evaluate_epoch(model, val_iterator, loop, device))
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        stop = update_early_stopping(state, metrics["val_loss"], epoch, loop["patience"])
        metrics.update(best_val_loss=state.best_val_loss, best_epoch=state.best_epoch + 1,
                       stopped_early=stop and epoch + 1 < loop["epochs"],
                       epoch_seconds=time.perf_counter() - started)
        state.history.append(metrics)
        state.next_epoch = epoch + 1
        epoch_seconds.append(metrics["epoch_seconds"])
        eta = sum(epoch_seconds) / len(epoch_seconds) * (loop["epochs"] - epoch - 1)
        print0(_format_epoch(metrics, loop["epochs"], eta))
        _report(model, optimizer, scaler, loop, state, metrics)
        if stop:
            print0(f"early stopping: no val-loss improvement for {loop['patience']} epochs; "
                   f"best epoch {state.best_epoch + 1}")
            break
