"""The HTTP endpoints. SQL work runs in sync ``def`` endpoints (FastAPI's threadpool), except
creating a job, the one endpoint under load, which hands its write to ``service.intake`` and
whose request ``service.submit_route`` parses; the event stream is async because it mostly
waits on Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.sse import EventSourceResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from byol_core.sweep import AnySpec
from service import admission, jobs
from service.auth import User, is_admin
from service.db import Job, Status
from service.deps import Svc
from service.events import job_events
from service.pagination import decode_cursor, encode_cursor
from service.schemas import PRINTABLE, ErrorBody, Health, JobDetail, JobEvent, JobPage, Readiness
from service.submit_route import KEY_RULES, SubmitRoute
from service.views import job_detail, job_view

log = logging.getLogger(__name__)

router = APIRouter()
# POST /jobs alone: its route parses the request itself (service.submit_route)
submit_router = APIRouter(route_class=SubmitRoute)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


UNAUTHORIZED = {401: _error("Missing or invalid bearer token (or none configured).")}
NOT_FOUND = {404: _error("No job with this id.")}
INVALID = {422: _error("A field is invalid; the body names it by dotted path.")}
DB_DOWN = {503: _error("The database does not answer.")}

UUID_SHAPE = re.compile(r"^[0-9a-fA-F-]{36}$")


def invalid(location: str, field: str, message: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors."""
    loc = (location, *field.split(".")) if field else (location,)
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def find_job(session: Session, job_id: str) -> Job:
    job = jobs.get_job(session, job_id) if UUID_SHAPE.match(job_id) else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


@submit_router.post(
    "/jobs",
    tags=["jobs"],
    summary="Submit a training job",
    description="Validates the body as a complete JobSpec (missing fields take their "
    "defaults), or as a SweepSpec when `kind` is `sweep` (a Ray Tune search over a base "
    "JobSpec), stores the resolved spec and queues the job. With an `Idempotency-Key`, a "
    "retry with the same key and the same spec returns the job created first with **200**; "
    "the same key with another spec is a 409. Keys are per user. The job is stored before it "
    "is announced to the workers, so it is never lost: if Redis is down the workers find it "
    "in SQL.",
    status_code=status.HTTP_201_CREATED,
    response_model=JobDetail,
    responses={
        200: {"model": JobDetail, "description": "Idempotent retry: the job created before."},
        **UNAUTHORIZED,
        409: _error("The Idempotency-Key was used before with another spec."),
        413: _error("The body is larger than BYOL_MAX_BODY_BYTES."),
        **INVALID,
        **DB_DOWN,
    },
)
async def create_job(
    spec: AnySpec,
    user: User,
    svc: Svc,
    idempotency_key: Annotated[
        str | None,
        Header(**KEY_RULES, description="Makes retries safe: one job per key and user."),
    ] = None,
) -> Response:
    # async, and the write batched with the other requests' (service.intake): no threadpool
    # hand-off per request, which under load cost as much CPU as the SQL itself
    document = spec.model_dump(mode="json")
    canonical = jobs.canonical(document)
    refused = admission.problems(spec, document, svc.data_root, canonical)
    if refused:
        raise RequestValidationError(
            [
                {"loc": ("body", *field.split(".")), "msg": message, "type": "value_error"}
                for field, message in refused
            ]
        )
    try:
        new = jobs.NewJob(document, user, idempotency_key, jobs.digest(document, canonical))
        job, created = await svc.intake.create(new)
    except jobs.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    # Serialized here, once: FastAPI's response_model path would validate the model again.
    return Response(
        job_detail(job, svc.mlflow_ui).model_dump_json(),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        media_type="application/json",
    )


@router.get(
    "/jobs",
    tags=["jobs"],
    summary="List jobs, newest first",
    description="Filter by status and name; page with `limit` and the `next_cursor` of the "
    "previous page. Jobs created while paging appear before the first page, never twice.",
    responses={**INVALID, **DB_DOWN},
)
def list_jobs(
    svc: Svc,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    name: Annotated[str | None, Query(max_length=200, pattern=PRINTABLE)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=100)] = None,
) -> JobPage:
    after = None
    if cursor is not None:
        after = decode_cursor(cursor)
        if after is None:
            raise invalid("query", "cursor", "not a cursor from this API")
    with svc.sessions() as session:
        page, next_seq = jobs.list_jobs(
            session, status=status_, name=name, after=after, limit=limit
        )
    return JobPage(
        jobs=[job_view(job, svc.mlflow_ui) for job in page],
        next_cursor=encode_cursor(next_seq) if next_seq is not None else None,
    )


@router.get(
    "/jobs/{job_id}",
    tags=["jobs"],
    summary="One job",
    description="Status, attempts, progress (epoch of epochs and the latest metrics), the "
    "MLflow run and a link to it, the result summary (linear top-1 and the collapse "
    "diagnostics) and the error of a failed job.",
    responses={**NOT_FOUND, **DB_DOWN},
)
def get_job(job_id: str, svc: Svc) -> JobDetail:
    with svc.sessions() as session:
        return job_detail(find_job(session, job_id), svc.mlflow_ui)


@router.post(
    "/jobs/{job_id}/cancel",
    tags=["jobs"],
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one becomes `cancelling` until "
    "its worker stops it. Cancelling a cancelled job is harmless; a job that succeeded or "
    "failed is a 409. Only the job's owner or an admin may cancel it.",
    responses={
        **UNAUTHORIZED,
        403: _error("The job belongs to another user."),
        **NOT_FOUND,
        409: _error("The job already finished."),
        **DB_DOWN,
    },
)
def cancel_job(job_id: str, user: User, svc: Svc) -> JobDetail:
    with svc.sessions() as session:
        job = find_job(session, job_id)
        if job.owner != user and not is_admin(svc.settings, user):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"job {job_id} belongs to another user")
        try:
            job = jobs.request_cancel(session, job)
        except jobs.Conflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    svc.queue.publish(job.id, {"status": job.status})
    return job_detail(job, svc.mlflow_ui)


def _load_job(sessions: sessionmaker, job_id: str) -> Job | None:
    with sessions() as session:
        return jobs.get_job(session, job_id)


def existing_job(job_id: str, svc: Svc) -> str:
    # A dependency, so an unknown job is a plain 404 before the event stream starts.
    with svc.sessions() as session:
        return find_job(session, job_id).id


@router.get(
    "/jobs/{job_id}/events",
    tags=["jobs"],
    summary="Follow a job as server-sent events",
    description="The first event is the job's current state; then one event per status "
    "change or finished epoch, as the worker reports them. The stream ends when the job "
    "reaches succeeded, failed or cancelled.",
    response_class=EventSourceResponse,
    responses={**NOT_FOUND, **DB_DOWN},
)
async def follow_job(
    job_id: Annotated[str, Depends(existing_job)], svc: Svc
) -> AsyncIterable[JobEvent]:
    async def load() -> Job | None:
        return await anyio.to_thread.run_sync(_load_job, svc.sessions, job_id)

    async for event in job_events(
        job_id,
        load,
        svc.events_redis,
        svc.queue.events_key(job_id),
        poll_seconds=svc.settings.poll_seconds,
    ):
        yield event


@router.get(
    "/healthz",
    tags=["health"],
    summary="Liveness",
    description="The process answers. Checks nothing else.",
)
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness",
    description="The database and Redis both answer; 503 (with the same body) otherwise.",
    responses={503: {"model": Readiness, "description": "Database or Redis unavailable."}},
)
def readyz(svc: Svc, response: Response) -> Readiness:
    database = _database_answers(svc)
    redis = svc.queue.ping()
    if not (database and redis):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(
        status="ready" if database and redis else "unavailable", database=database, redis=redis
    )


def _database_answers(svc: Svc) -> bool:
    try:
        with svc.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError as exc:
        log.warning("readiness: database unavailable: %s", exc)
        return False
