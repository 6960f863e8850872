"""A job row as the API shows it.

``progress`` and ``result`` are JSON the worker writes; they are read field by field and
anything of the wrong type is dropped, so a worker that writes something unexpected costs a
missing field in the response, never a 500.
"""

from __future__ import annotations

import math
from typing import Any

from service.db import Job, Status, as_utc
from service.schemas import (
    JobDetail,
    JobEvent,
    JobView,
    MLflowRun,
    Progress,
    ResultSummary,
    SweepView,
    Trial,
)

SUMMARY_FIELDS = ("linear_top1", "knn_top1", "cos_pos", "cos_neg", "z_std")
STATUSES = tuple(status.value for status in Status)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return None


def progress_view(raw: Any) -> Progress | None:
    if not isinstance(raw, dict):
        return None
    metrics = raw.get("metrics")
    return Progress(
        epoch=_integer(raw.get("epoch")),
        epochs=_integer(raw.get("epochs")),
        metrics={str(k): _number(v) for k, v in metrics.items()}
        if isinstance(metrics, dict)
        else {},
    )


def result_view(raw: Any) -> ResultSummary | None:
    if not isinstance(raw, dict):
        return None
    return ResultSummary(
        **{name: _number(raw.get(name)) for name in SUMMARY_FIELDS},
        checkpoint=_text(raw.get("checkpoint")),
    )


def trial_view(raw: Any) -> Trial | None:
    if not isinstance(raw, dict) or _text(raw.get("trial_id")) is None:
        return None
    config = raw.get("config")
    return Trial(
        trial_id=_text(raw["trial_id"]),
        config=config if isinstance(config, dict) else {},
        status=_text(raw.get("status")) or "unknown",
        best_metric=_number(raw.get("best_metric")),
        epochs=_integer(raw.get("epochs")),
        mlflow_run_id=_text(raw.get("mlflow_run_id")),
        error=_text(raw.get("error")),
    )


def sweep_view(job: Job) -> SweepView | None:
    """The finished sweep's summary (result), else the trials the worker last saw (progress)."""
    if job.kind != "sweep":
        return None
    source = job.result if isinstance(job.result, dict) else job.progress
    if not isinstance(source, dict):
        return SweepView()
    trials = source.get("trials") if isinstance(source.get("trials"), list) else []
    best_config = source.get("best_config")
    return SweepView(
        metric=_text(source.get("metric")),
        mode=_text(source.get("mode")),
        trials=[t for t in map(trial_view, trials) if t is not None],
        best=trial_view(source.get("best")),
        best_config=best_config if isinstance(best_config, dict) else None,
    )


def mlflow_view(job: Job, ui_base: str | None) -> MLflowRun | None:
    result = job.result if isinstance(job.result, dict) else {}
    progress = job.progress if isinstance(job.progress, dict) else {}
    run_id = job.mlflow_run_id or _text(result.get("mlflow_run_id"))
    if not run_id:
        return None
    experiment = _text(result.get("experiment_id")) or _text(progress.get("experiment_id"))
    url = None
    if ui_base and experiment:
        url = f"{ui_base}/#/experiments/{experiment}/runs/{run_id}"
    return MLflowRun(run_id=run_id, experiment_id=experiment, url=url)


def job_view(job: Job, ui_base: str | None) -> JobView:
    return JobView(**_fields(job, ui_base))


def job_detail(job: Job, ui_base: str | None) -> JobDetail:
    return JobDetail(**_fields(job, ui_base), spec=job.spec)


def _fields(job: Job, ui_base: str | None) -> dict[str, Any]:
    return {
        "id": job.id,
        "name": job.name,
        "kind": job.kind,
        "owner": job.owner,
        "status": Status(job.status),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "progress": progress_view(job.progress),
        "mlflow": mlflow_view(job, ui_base),
        "result": result_view(job.result) if job.kind != "sweep" else None,
        "sweep": sweep_view(job),
        "error": job.error,
        "created_at": as_utc(job.created_at),
        "updated_at": as_utc(job.updated_at),
        "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
    }


def job_event(job: Job) -> JobEvent:
    return JobEvent(
        job_id=job.id,
        status=Status(job.status),
        progress=progress_view(job.progress),
        error=job.error,
    )


def worker_event(job_id: str, raw: Any) -> JobEvent | None:
    """An event the worker published on Redis; None if it names no known status."""
    if not isinstance(raw, dict) or raw.get("status") not in STATUSES:
        return None
    error = raw.get("error")
    return JobEvent(
        job_id=job_id,
        status=Status(raw["status"]),
        progress=progress_view(raw.get("progress")),
        error=error if isinstance(error, str) else None,
    )
