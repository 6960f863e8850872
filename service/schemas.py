"""The API's response models: what a client sees of a job, and the error body.

They are separate from the SQL row on purpose: the row holds the worker's JSON as it wrote it,
and these models are the documented contract, built from it tolerantly by ``service.views``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.db import Status

# Printable text: NUL and control characters cannot be stored and are never meant.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class Progress(BaseModel):
    epoch: int | None = Field(None, description="Last finished epoch (1-based).")
    epochs: int | None = Field(None, description="Epochs the job will train.")
    metrics: dict[str, float | None] = Field(
        default_factory=dict, description="Latest per-epoch metrics, e.g. train/loss."
    )


class ResultSummary(BaseModel):
    """The worker's run summary: final evaluation and the study's collapse diagnostics."""

    linear_top1: float | None = Field(None, description="Final linear-evaluation top-1.")
    knn_top1: float | None = None
    cos_pos: float | None = Field(
        None, description="Mean cosine of online and target projections of the same image."
    )
    cos_neg: float | None = Field(None, description="The same for different images.")
    z_std: float | None = Field(
        None, description="Projection std: about 1/sqrt(d) healthy, 0 collapsed."
    )
    checkpoint: str | None = None


class Trial(BaseModel):
    """One trial of a sweep."""

    trial_id: str
    config: dict[str, Any] = Field(description="The sampled values, by dotted spec field.")
    status: str = Field(description="running, finished, stopped (early, by ASHA) or failed.")
    best_metric: float | None = Field(None, description="Best value of the sweep's metric.")
    epochs: int | None = Field(None, description="Epochs the trial trained.")
    mlflow_run_id: str | None = Field(None, description="The trial's child MLflow run.")
    error: str | None = None


class SweepView(BaseModel):
    """A sweep's trials (while it runs, from its MLflow child runs) and, at the end, the best."""

    metric: str | None = None
    mode: str | None = None
    trials: list[Trial] = Field(default_factory=list)
    best: Trial | None = Field(None, description="The best trial, once the sweep finished.")
    best_config: dict[str, Any] | None = None


class MLflowRun(BaseModel):
    run_id: str
    experiment_id: str | None = None
    url: str | None = Field(None, description="The run in the MLflow UI, when it is known.")


class JobView(BaseModel):
    id: str
    name: str
    kind: str
    owner: str
    status: Status
    attempts: int = Field(description="Runs started so far (a worker that dies costs one).")
    max_attempts: int
    cancel_requested: bool
    progress: Progress | None = None
    mlflow: MLflowRun | None = None
    result: ResultSummary | None = None
    sweep: SweepView | None = Field(None, description="Sweeps only: trials and the best one.")
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobDetail(JobView):
    spec: dict[str, Any] = Field(description="The fully resolved JobSpec the job runs.")


class JobPage(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class JobEvent(BaseModel):
    """One server-sent event: the job's state, first from SQL, then as the worker reports it."""

    job_id: str
    status: Status
    progress: Progress | None = None
    error: str | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    database: bool
    redis: bool


class FieldError(BaseModel):
    field: str = Field(description="Dotted path, e.g. optim.lr; empty for the whole body.")
    location: str = Field(description="body, query, header or path.")
    message: str


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")
    errors: list[FieldError] | None = Field(None, description="Per-field problems (422).")
