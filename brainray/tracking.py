"""Experiment tracking of a training run: TensorBoard event files always, MLflow when asked.

The driver receives each epoch's metrics from rank 0 (brainray.console events), so only one
process ever logs. TensorBoard events go to <run>/tensorboard/ (written locally and copied there
after every epoch when the run directory is on S3), so `tensorboard --logdir runs/` works as is.
With --mlflow-tracking-uri (or MLFLOW_TRACKING_URI) the same run goes to MLflow: the resolved
config as params, per-epoch metrics, the final test metrics, the run's files as artifacts, and
optionally a registered model version tagged with the test metrics. The MLflow run id is kept in
the run directory, so a resumed run continues the same MLflow run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from torch.utils.tensorboard import SummaryWriter

from brainray import storage
from brainray.checkpoint import (
    ACCURACY_PNG,
    CONFUSION_PNG,
    COVERAGE_PNG,
    LOSS_PNG,
    METRICS_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    RELIABILITY_PNG,
)
from brainray.config import TrainConfig, to_dict
from brainray.console import say
from brainray.html_report import REPORT_FILE

TENSORBOARD_DIR = "tensorboard"
MLFLOW_RUN_FILE = "mlflow_run.json"
# Per-epoch scalars: (metrics.json history key, TensorBoard tag).
EPOCH_SCALARS = (("train_loss", "loss/train"), ("val_loss", "loss/val"),
                 ("train_accuracy", "accuracy/train"), ("val_accuracy", "accuracy/val"),
                 ("lr", "lr"), ("images_per_s", "images_per_s"))
FINAL_METRICS = ("accuracy", "macro_f1", "loss", "ece", "roc_auc")
ARTIFACTS = (MODEL_FILE, METRICS_FILE, MODEL_CARD_FILE, REPORT_FILE, CONFUSION_PNG, ACCURACY_PNG,
             LOSS_PNG, RELIABILITY_PNG, COVERAGE_PNG)


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow's limit on a param value
    return out


class RunTracker:
    """TensorBoard (and MLflow) logging of one training run, on the driver."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.options = config.storage
        self.local_run = storage.is_local(config.run_dir)
        tb_dir = (storage.join(config.run_dir, TENSORBOARD_DIR) if self.local_run
                  else tempfile.mkdtemp(prefix="brainray-tb-"))
        self.tb_dir = tb_dir
        self.writer = SummaryWriter(log_dir=tb_dir)
        self.mlflow = None
        if config.mlflow_tracking_uri:
            self.mlflow = _MlflowRun(config)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run that failed ends its MLflow run as FAILED; the event file is closed either way,
        and its local copy for a run on S3 removed (each epoch already uploaded it)."""
        self.writer.close()
        if not self.local_run:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
        if exc_type is not None and self.mlflow is not None:
            self.mlflow.end(status="FAILED")

    def epoch(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        for key, tag in EPOCH_SCALARS:
            if key in metrics:
                self.writer.add_scalar(tag, float(metrics[key]), step)
        self.writer.flush()
        if not self.local_run:
            self._upload_tensorboard()
        if self.mlflow is not None:
            self.mlflow.log_epoch(metrics, step)

    def finish(self, report: dict) -> None:
        """The final figures and files; a tracking failure here never fails the finished run."""
        self.writer.close()
        try:
            if not self.local_run:
                self._upload_tensorboard()
            if self.mlflow is not None:
                self.mlflow.finish(report)
        except Exception as exc:
            say(f"warning: experiment tracking failed at the end of the run: {exc}")

    def _upload_tensorboard(self) -> None:
        for name in os.listdir(self.tb_dir):
            with open(os.path.join(self.tb_dir, name), "rb") as f:
                storage.write_bytes(storage.join(self.config.run_dir, TENSORBOARD_DIR, name),
                                    f.read(), self.options)


class _MlflowRun:
    """The MLflow side: one MLflow run per brainray run directory, resumed with it.

    Everything goes through an `MlflowClient` with the run id: the fluent API's active run is
    per thread, and epochs are logged from the driver's event thread.
    """

    def __init__(self, config: TrainConfig):
        try:
            import mlflow
            from mlflow.entities import Metric, Param
        except ImportError as exc:
            raise RuntimeError("--mlflow-tracking-uri needs MLflow: pip install "
                               "'brainray[mlflow]'") from exc
        self.config, self.Metric = config, Metric
        self.client = mlflow.MlflowClient(tracking_uri=config.mlflow_tracking_uri)
        record_uri = storage.join(config.run_dir, MLFLOW_RUN_FILE)
        if storage.exists(record_uri, config.storage):
            self.run_id = storage.read_json(record_uri, config.storage)["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(config.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(config.mlflow_experiment))
        self.run_id = self.client.create_run(experiment_id).info.run_id
        params = _flatten("", storage.redact_values(to_dict(config)), {})
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        storage.write_json(record_uri, {"run_id": self.run_id, "experiment_id": experiment_id},
                           config.storage)

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.Metric(key, float(value), now, step) for key, value in values.items()])

    def log_epoch(self, metrics: dict, step: int) -> None:
        self._log_metrics({key: metrics[key] for key, _ in EPOCH_SCALARS if key in metrics},
                          step)

    def finish(self, report: dict) -> None:
        final = {f"test_{k}": float(report[k]) for k in FINAL_METRICS
                 if isinstance(report.get(k), int | float)}
        final["baseline_1nn_accuracy"] = float(report["baseline_1nn"]["accuracy"])
        self._log_metrics(final, step=0)
        with tempfile.TemporaryDirectory() as directory:
            for name in ARTIFACTS:
                uri = storage.join(self.config.run_dir, name)
                if storage.exists(uri, self.config.storage):
                    with open(os.path.join(directory, name), "wb") as f:
                        f.write(storage.read_bytes(uri, self.config.storage))
            self.client.log_artifacts(self.run_id, directory)
        if self.config.mlflow_registered_model:
            self._register(final)
        self.end(status="FINISHED")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def _register(self, tags: dict) -> None:
        name = self.config.mlflow_registered_model
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{MODEL_FILE}"
        self.client.create_model_version(name, source=source, run_id=self.run_id,
                                         tags={k: f"{v:.6g}" for k, v in tags.items()})
