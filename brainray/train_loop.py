"""The Ray Train loop: DDP training of one model, early stopping, resumable checkpoints.

`train_loop_per_worker` runs on every worker; the driver side (data, trainer, report) is the
training job, `brainray.train`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from brainray.backbones import load_backbone
from brainray.checkpoint import make_checkpoint, read_train_checkpoint, write_train_checkpoint
from brainray.config import COL_IMAGE, COL_LABEL, AugmentConfig, PreprocessConfig
from brainray.model import build_model, count_parameters, unwrap
from brainray.precision import autocast_for, prepare
from brainray.presets import TrainPreset
from brainray.transforms import augmentation_generator, to_model_input

PROGRESS_INTERVAL_S = 1.0  # a progress event to the driver (a bar's update on a terminal)


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


# The driver's event queue (brainray.console.Events) for this worker process; None when the loop
# runs without one (then rank 0 prints).
_EVENTS = None


def send0(kind: str, payload) -> None:
    """Tell the driver, once, from rank 0 (brainray.console renders it)."""
    if ray.train.get_context().get_world_rank() != 0:
        return
    if _EVENTS is not None:
        _EVENTS.send(kind, payload)
    elif kind == "line":
        # Bypasses Ray Train's patched `print`, which echoes every line twice on the driver.
        sys.stdout.write(payload + "\n")
        sys.stdout.flush()


def print0(message: str) -> None:
    send0("line", message)


# One-cycle (Smith & Topor, 2017, as torch's OneCycleLR): up from lr / 25 over the first 25% of
# the steps, then cosine down to lr / 25e4. Written as a factor of the peak so that one LambdaLR
# serves every schedule and a resumed run may raise --epochs.
ONECYCLE_WARM_FRACTION = 0.25
ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 25e4


def _cosine(progress: float, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def lr_factor(step: int, steps_per_epoch: int, config: dict) -> float:
    """The learning rate at optimizer step `step`, as a fraction of the peak `lr`."""
    total = max(1, config["epochs"] * steps_per_epoch)
    if config["lr_schedule"] == "onecycle":
        warm = max(1, round(ONECYCLE_WARM_FRACTION * total))
        if step < warm:
            return _cosine(step / warm, ONECYCLE_START, 1.0)
        return _cosine((step - warm) / max(1, total - warm), 1.0, ONECYCLE_END)
    warmup = config["warmup_epochs"] * steps_per_epoch
    if step < warmup:  # linear warm-up, then cosine decay to zero (or constant)
        return (step + 1) / warmup
    if config["lr_schedule"] == "constant":
        return 1.0
    return _cosine((step - warmup) / max(1, total - warmup), 1.0, 0.0)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device, *,
                   kind: str = "adam", backbone_lr_factor: float | None = None
                   ) -> torch.optim.Optimizer:
    """Adam or AdamW with the fused kernel where PyTorch has one (CPU and CUDA): the same update
    rule, one pass over the parameters instead of a chain of elementwise ops (~12% of a
    paper_cnn step on 2 CPU cores).

    With `backbone_lr_factor` (fine-tuning pretrained weights), every parameter but the new
    classification head learns at lr x factor, so the head can catch up without the backbone
    forgetting what it brought.
    """
    network = unwrap(model)
    groups = [{"params": list(network.parameters())}]
    if backbone_lr_factor is not None and hasattr(network, "head_parameter_names"):
        head = network.head_parameter_names()
        named = list(network.named_parameters())
        groups = [{"params": [p for n, p in named if n not in head], "lr": lr * backbone_lr_factor},
                  {"params": [p for n, p in named if n in head], "lr": lr}]
    optimizer_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    fused = device.type in ("cpu", "cuda")
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, loop: dict
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Steps once per optimizer step; every group follows the same factor of its own peak."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, loop["steps_per_epoch"], loop))


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics (decay per step),
    or None when `decay` is 0."""
    if not decay:
        return None
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay),
                         use_buffers=True)


def update_ema(ema: AveragedModel, model: nn.Module, epoch: int, warmup_epochs: int) -> None:
    """Average in the current weights; during warm-up the average restarts from them at every
    step (as torchvision's reference recipe does), so it never carries the random start."""
    ema.update_parameters(unwrap(model))
    if epoch < warmup_epochs:
        ema.n_averaged.fill_(0)


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


class EpochMeter:
    """One epoch's sums (kept on the device: a .item() per step would stall a GPU's queue), the
    time the model sat idle waiting for data, and a progress line every PROGRESS_INTERVAL_S."""

    def __init__(self, device: torch.device, epoch: int):
        self.epoch = epoch
        self.world = ray.train.get_context().get_world_size()  # for the whole-run estimate
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.device, self.seen, self.input_wait = device, 0, 0.0
        self.started = self.last_sent = time.perf_counter()

    def timed(self, batches):
        """Yield from `batches`, adding the time each one took to arrive to the input wait."""
        batches = iter(batches)
        while True:
            waited_from = time.perf_counter()
            batch = next(batches, None)
            self.input_wait += time.perf_counter() - waited_from
            if batch is None:
                return
            yield batch

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        now = time.perf_counter()
        if now - self.last_sent > PROGRESS_INTERVAL_S:
            send0("progress", {"epoch": self.epoch + 1, "images": self.seen * self.world,
                               "loss": self.loss_sum.item() / self.seen,
                               "images_per_s": self.seen * self.world / (now - self.started)})
            self.last_sent = now

    def summary(self) -> dict:
        """The epoch's figures over all workers."""
        elapsed = time.perf_counter() - self.started
        loss_sum, correct, seen, input_wait = _all_reduce_sums(
            [self.loss_sum.item(), self.correct.item(), self.seen, self.input_wait], self.device)
        world = ray.train.get_context().get_world_size()
        return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                "train_images": int(seen), "train_seconds": elapsed,
                "images_per_s": seen / max(elapsed, 1e-9),
                "input_wait_fraction": input_wait / world / max(elapsed, 1e-9)}


def _epoch_batches(shard, loop: dict, epoch: int, rank: int):
    return shard.iter_batches(
        batch_size=loop["batch_size_per_worker"], batch_format="numpy", prefetch_batches=2,
        local_shuffle_buffer_size=loop["shuffle_buffer_images"],
        local_shuffle_seed=loop["seed"] * 1_000_003 + epoch * 1_009 + rank)


def _training_input(batch, loop: dict, generator: torch.Generator, device: torch.device):
    images, y = _to_device(batch, device)
    return loop["preset"].batch(images, generator), y


def train_one_epoch(model, optimizer, scheduler, scaler, ema, shard, loop: dict, epoch: int,
                    device: torch.device) -> dict:
    model.train()
    rank = ray.train.get_context().get_world_rank()
    generator = augmentation_generator(loop["seed"], epoch, rank)
    meter = EpochMeter(device, epoch)
    for batch in meter.timed(_epoch_batches(shard, loop, epoch, rank)):
        x, y = _training_input(batch, loop, generator, device)
        with autocast_for(device, loop["precision"]):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y,
                                               label_smoothing=loop["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            update_ema(ema, model, epoch, loop["warmup_epochs"])
        meter.update(loss, logits, y)
    return meter.summary()


def evaluate_epoch(model, val_iterator, loop: dict, device: torch.device) -> dict:
    """Exact validation loss and accuracy (plain cross-entropy, whatever the training loss):
    each worker takes every world_size-th batch of all."""
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


def validate(model, ema, val_iterator, loop: dict, device: torch.device) -> dict:
    """Validation of the model that is checkpointed (the EMA when there is one); with an EMA, the
    raw weights' figures too, so a run shows what the average adds."""
    if ema is None:
        return evaluate_epoch(model, val_iterator, loop, device)
    raw = evaluate_epoch(model, val_iterator, loop, device)
    return {**evaluate_epoch(ema.module, val_iterator, loop, device),
            "val_loss_raw": raw["val_loss"], "val_accuracy_raw": raw["val_accuracy"]}


@dataclass
class Trainable:
    """What the loop updates and a checkpoint must restore."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are validated, checkpointed and shipped."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    def state(self, loop_state: LoopState) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "loop_state": asdict(loop_state)}
        if self.ema is not None:  # model.pt then holds the average: keep the raw weights too
            state["raw_state_dict"] = unwrap(self.model).state_dict()
            state["ema_n_averaged"] = self.ema.n_averaged
        return state


def _restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """A run may be relaunched in another precision (fp32 on CPU, then fp16 on a GPU): the loss
    scaler then starts afresh instead of failing on the other precision's (empty) state."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled() != bool(saved):
        print0("the precision differs from the checkpoint's: starting with a fresh loss scaler")


def _restore(trainable: Trainable, loop: dict) -> LoopState:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return LoopState()
    with checkpoint.as_directory() as directory:
        weights, state = read_train_checkpoint(directory)
    unwrap(trainable.model).load_state_dict(state.get("raw_state_dict", weights["state_dict"]))
    if trainable.ema is not None:
        trainable.ema.module.load_state_dict(weights["state_dict"])
        trainable.ema.n_averaged.copy_(state.get("ema_n_averaged", torch.tensor(0)))
    trainable.optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        trainable.scheduler.load_state_dict(state["scheduler"])
    else:  # written before the schedule was an object: it kept the step count itself
        trainable.scheduler.last_epoch = state["step"]
    _restore_scaler(trainable.scaler, state["scaler"])
    restored = LoopState(**state["loop_state"])
    restored.resumed_at_epochs.append(restored.next_epoch + 1)
    print0(f"resuming from the checkpoint of epoch {restored.next_epoch} "
           f"(best val loss {restored.best_val_loss:.4f} at epoch {restored.best_epoch + 1})")
    return restored


def _report(trainable: Trainable, loop: dict, state: LoopState, metrics: dict) -> None:
    """Report metrics from every worker (a barrier) and a checkpoint from rank 0."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        payload = make_checkpoint(
            trainable.evaluated, model_name=loop["model"], classes=loop["classes"],
            preprocess=loop["preprocess_config"], config=loop["config"], metrics=metrics,
            epoch=metrics["epoch"], architecture=loop["architecture"],
            test_time_augmentation=loop["tta"], initial_weights=loop["initial_weights_source"])
        write_train_checkpoint(directory, payload, trainable.state(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _thread_count(loop: dict) -> int:
    """Explicit --torch-threads, else this node's cores split among the workers placed on it.

    Ray reserves `cpus_per_worker` for scheduling, but a worker that is alone on a node can use
    every core while Ray Data tasks (light once images are cached) fit in between.
    """
    if loop["torch_threads"] > 0:
        return loop["torch_threads"]
    local_workers = max(1, ray.train.get_context().get_local_world_size())
    return max(int(loop["cpus_per_worker"]), (os.cpu_count() or 1) // local_workers, 1)


def _build(loop: dict, device: torch.device) -> Trainable:
    """Model (initial weights loaded before DDP broadcasts rank 0's), optimizer, schedule,
    loss scaler and EMA; nothing restored yet."""
    torch.manual_seed(loop["seed"])  # the same initial weights on every rank
    model = build_model(loop["model"], len(loop["classes"]), loop["preprocess"]["image_size"],
                        loop["architecture"])
    if loop.get("initial_weights") is not None and ray.train.get_checkpoint() is None:
        load_backbone(model, ray.get(loop["initial_weights"]), loop["weights"])
    precision = prepare(model, device, loop["precision"])
    print0(f"model {loop['model']}: {count_parameters(model):,} parameters, precision "
           f"{precision}" + (" (auto)" if loop["precision"] == "auto" else ""))
    loop["precision"] = precision
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    # Dropout and augmentation draw from here: each rank its own stream (the same stream on
    # every rank would give every worker the same dropout masks).
    torch.manual_seed(loop["seed"] * 1_000_003 + 7919 * (ray.train.get_context().get_world_rank()
                                                        + 1))
    optimizer = make_optimizer(
        model, loop["lr"], loop["weight_decay"], device, kind=loop["optimizer"],
        backbone_lr_factor=loop["backbone_lr_factor"] if loop["weights"] else None)
    # Loss scaling only matters for fp16 on GPU; elsewhere the scaler is a no-op passthrough.
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=device.type == "cuda" and precision == "fp16")
    return Trainable(model, optimizer, make_scheduler(optimizer, loop), scaler,
                     make_ema(model, loop["ema_decay"]))


def train_loop_per_worker(loop: dict) -> None:
    """Build model and optimizer, resume if a checkpoint exists, train epochs, early-stop."""
    global _EVENTS
    _EVENTS = loop.get("events")
    torch.set_num_threads(_thread_count(loop))
    device = ray.train.torch.get_device()
    world = ray.train.get_context().get_world_size()
    preprocess = PreprocessConfig(**loop["preprocess"])
    loop = dict(loop, preprocess_config=preprocess,
                preset=TrainPreset(preprocess, AugmentConfig.preset(loop["augment"])),
                steps_per_epoch=max(1, math.ceil(loop["n_train"] / (
                    loop["batch_size_per_worker"] * world))))
    trainable = _build(loop, device)
    state = _restore(trainable, loop)
    train_shard = ray.train.get_dataset_shard("train")
    val_iterator = ray.train.get_dataset_shard("val")
    if state.epochs_since_best >= loop["patience"]:
        print0(f"run already stopped early at epoch {state.next_epoch}; nothing to train")
        return
    epoch_seconds: list[float] = []
    for epoch in range(state.next_epoch, loop["epochs"]):
        started = time.perf_counter()
        lr = trainable.optimizer.param_groups[-1]["lr"]  # the head's, when groups differ
        metrics = {"epoch": epoch + 1, "precision": loop["precision"], "lr": lr,
                   **train_one_epoch(trainable.model, trainable.optimizer, trainable.scheduler,
                                     trainable.scaler, trainable.ema, train_shard, loop, epoch,
                                     device),
                   **validate(trainable.model, trainable.ema, val_iterator, loop, device)}
        stop = update_early_stopping(state, metrics["val_loss"], epoch, loop["patience"])
        metrics.update(best_val_loss=state.best_val_loss, best_epoch=state.best_epoch + 1,
                       stopped_early=stop and epoch + 1 < loop["epochs"],
                       epoch_seconds=time.perf_counter() - started)
        state.history.append(metrics)
        state.next_epoch = epoch + 1
        epoch_seconds.append(metrics["epoch_seconds"])
        eta = sum(epoch_seconds) / len(epoch_seconds) * (loop["epochs"] - epoch - 1)
        send0("epoch", {"metrics": metrics, "epochs": loop["epochs"], "eta_s": eta})
        _report(trainable, loop, state, metrics)
        if stop:
            print0(f"early stopping: no val-loss improvement for {loop['patience']} epochs; "
                   f"best epoch {state.best_epoch + 1}")
            break
