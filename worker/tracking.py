"""MLflow tracking for a job: one run per job, metrics per epoch, checkpoints and figures.

Embedded default: a SQLite store and an artifact folder under ``./mlruns`` (resolved to absolute
paths in the driver, since Ray workers run elsewhere). ``MLFLOW_TRACKING_URI`` points at a server.
Metrics are written by rank 0 after the epoch's checkpoint is reported; an epoch already in the
run is never written again, and a resumed worker first back-fills any epoch of its restored history
that MLflow is missing: every epoch appears exactly once in every metric history.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking import MlflowClient

from byol_core.spec import JobSpec

EXPERIMENT = "byol"
RUN_KEY_TAG = "byol.run_key"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def start_or_resume_run(
    spec: JobSpec, run_key: str, uri: str, tags: dict[str, str] | None = None
) -> str:
    """The MLflow run of this job: found by its key when it exists (a resumed job), else
    created with the flattened spec as parameters. ``tags``: more tags for a new run (a
    sweep's trial gives ``mlflow.parentRunId``)."""
    tags = {"byol.variant": str(spec.variant), **(tags or {})}
    return open_run(run_key, uri, spec.name, tags, flatten(spec.model_dump(mode="json")))


def open_run(
    run_key: str, uri: str, name: str, tags: dict[str, str], params: dict[str, str]
) -> str:
    """The run tagged with ``run_key``, set running again; else a new one with these tags and
    parameters."""
    client = MlflowClient(uri)
    experiment_id = experiment(client, uri)
    found = find_run(run_key, uri, experiment_id)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={RUN_KEY_TAG: run_key, **tags})
    batch = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(batch), 100):  # MLflow's batch limit for params
        client.log_batch(run.info.run_id, params=batch[start : start + 100])
    return run.info.run_id


def find_run(run_key: str, uri: str, experiment_id: str | None = None) -> Run | None:
    """The run tagged with ``run_key``, if there is one."""
    client = MlflowClient(uri)
    experiment_id = experiment_id or experiment(client, uri)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1
    )
    return found[0] if found else None


def experiment(client: MlflowClient, uri: str) -> str:
    """The id of the ``byol`` experiment, created on first use."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=artifacts)


class EpochLogger:
    """Rank 0's writer of per-epoch metrics (``step`` = epoch) into one run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id
        # Epochs already in the run: a worker group restarted before its first checkpoint was
        # registered trains epoch 1 again, and must not log it twice.
        self.done = self.logged_epochs()

    def logged_epochs(self) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}

    def log_epoch(self, metrics: dict[str, float]) -> None:
        epoch, now = int(metrics["epoch"]), int(time.time() * 1000)
        if epoch in self.done:
            return
        # "epoch" is logged too: it marks the epoch as done, also for evaluation-only runs.
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        self.done.add(epoch)

    def backfill(self, history: list[dict[str, float]]) -> None:
        """Log the restored history's epochs that the run is missing (a crash between the
        checkpoint and the metrics)."""
        for metrics in history:
            self.log_epoch(metrics)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.from_string(status)))
