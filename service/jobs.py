"""The job state machine on SQL: create, list, cancel, and the worker's lease.

    queued -> running -> succeeded | failed | cancelled
                      -> cancelling -> cancelled

A worker owns a running job through a lease it renews with heartbeats. Every transition is one
conditional UPDATE, so two workers can never both own a job, and a worker that died (its lease
expired) hands the job to the next one, which resumes it from its last checkpoint, until
``max_attempts`` runs have been spent.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic_core import to_json
from sqlalchemy import DateTime, Select, bindparam, or_, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from service.db import TERMINAL, Job, Status, utcnow


class Conflict(Exception):
    """The request conflicts with the job's state or with an earlier request."""


def canonical(spec: dict[str, Any]) -> str:
    """The spec as idempotency compares it: keys sorted, so that a retry listing the keys of a
    free-form mapping in another order is the same spec."""
    return json.dumps(spec, sort_keys=True)


def digest(spec: dict[str, Any], canonical_text: str | None = None) -> str:
    """``canonical_text``: ``canonical(spec)`` when the caller has it already."""
    text = canonical(spec) if canonical_text is None else canonical_text
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class NewJob:
    """A job to create: the resolved spec, its owner and the request's idempotency key."""

    spec: dict[str, Any]
    owner: str
    idempotency_key: str | None = None
    spec_digest: str | None = None  # digest(spec), when the caller has it


def create_job(
    session: Session,
    spec: dict[str, Any],
    *,
    owner: str,
    max_attempts: int,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; returns (job, created). A repeated idempotency key with the same
    spec returns the first job; with another spec it raises Conflict."""
    (outcome,) = create_jobs(
        session, [NewJob(spec, owner, idempotency_key)], max_attempts=max_attempts
    )
    if isinstance(outcome, Conflict):
        raise outcome
    return outcome


def create_jobs(
    session: Session, batch: Sequence[NewJob], *, max_attempts: int
) -> list[tuple[Job, bool] | Conflict]:
    """Insert queued jobs with one statement and one commit; for each, (job, created) or the
    Conflict of a key used before with another spec.

    Insert first and look a key up only when its row was skipped: a retry is the rare case,
    and the unique (owner, key) constraint decides races between retries, here and in other
    processes, because a skipped row waited for the transaction holding its key to end."""
    now = utcnow()
    rows = [_row(new, max_attempts, now) for new in batch]
    inserted = _insert_new(session, rows)
    outcomes: list[tuple[Job, bool] | Conflict] = []
    for new, row in zip(batch, rows, strict=True):
        if row["id"] in inserted:
            outcomes.append((Job(**row), True))
            continue
        # A skipped row without a key could only have collided on a random UUID: never.
        found = _by_key(session, new.owner, new.idempotency_key) if new.idempotency_key else None
        if found is None:
            raise RuntimeError(f"job {row['id']} was neither inserted nor found by its key")
        try:
            outcomes.append((_same_or_conflict(found, row["spec_digest"]), False))
        except Conflict as conflict:
            outcomes.append(conflict)
    session.commit()
    return outcomes


def _row(new: NewJob, max_attempts: int, now: datetime) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": new.spec.get("name", "byol"),
        "kind": new.spec.get("kind", "train"),
        "owner": new.owner,
        "spec": new.spec,
        "spec_digest": new.spec_digest or digest(new.spec),
        "idempotency_key": new.idempotency_key,
        "status": Status.queued,
        "attempts": 0,
        "max_attempts": max_attempts,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
    }


# PostgreSQL: the whole batch is one JSON parameter that the server unpacks into rows. The
# statement's text is the same for every batch, so psycopg parses it once and prepares it on the
# server after a few uses. A multi-row VALUES list (SQLAlchemy's "insertmanyvalues") is new text
# on every batch, and at 13 parameters a row it is past psycopg's statement cache: parsing it
# was a third of a batch's CPU. (Arrays per column would need every spec escaped as an array
# element, slower still.)
BATCH_INSERT = text(
    """
    INSERT INTO jobs (id, name, kind, owner, spec, spec_digest, idempotency_key,
                      status, attempts, max_attempts, cancel_requested, created_at, updated_at)
    SELECT new.id, new.name, new.kind, new.owner, new.spec, new.spec_digest,
           new.idempotency_key, :status, 0, :max_attempts, false, :now, :now
    FROM json_to_recordset(CAST(:batch AS json))
         AS new(id text, name text, kind text, owner text, spec json, spec_digest text,
                idempotency_key text)
    ON CONFLICT DO NOTHING
    RETURNING id
    """
).bindparams(bindparam("now", type_=DateTime(timezone=True)))
BATCH_FIELDS = ("id", "name", "kind", "owner", "spec", "spec_digest", "idempotency_key")


def _insert_new(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert the rows whose (owner, key) is free; returns the ids of those inserted."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        first = rows[0]  # a batch shares these
        # pydantic's encoder, a fifth of json.dumps's time; NaN spelled as json.dumps does
        news = [{field: row[field] for field in BATCH_FIELDS} for row in rows]
        batch = to_json(news, inf_nan_mode="constants").decode()
        params = {
            "batch": batch,
            "status": str(first["status"]),
            "max_attempts": first["max_attempts"],
            "now": first["created_at"],
        }
        return set(session.scalars(BATCH_INSERT, params))
    if dialect == "sqlite":
        skip_taken = sqlite.insert(Job.__table__).on_conflict_do_nothing()
        return set(session.scalars(skip_taken.returning(Job.__table__.c.id), rows))
    raise ValueError(f"unsupported database {dialect!r}: use PostgreSQL or SQLite")


def _by_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def _same_or_conflict(job: Job, spec_digest: str) -> Job:
    if job.spec_digest != spec_digest:
        raise Conflict("Idempotency-Key was already used with a different job spec")
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id))


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    name: str | None = None,
    after: int | None = None,
    limit: int = 50,
) -> tuple[list[Job], int | None]:
    """Newest first. Returns the page and the cursor of the next page (None at the end)."""
    query: Select = select(Job).order_by(Job.seq.desc()).limit(limit + 1)
    if status:
        query = query.where(Job.status == status)
    if name:
        query = query.where(Job.name == name)
    if after is not None:
        query = query.where(Job.seq < after)
    jobs = list(session.scalars(query))
    if len(jobs) > limit:
        return jobs[:limit], jobs[limit - 1].seq
    return jobs, None


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one moves to cancelling and its worker
    stops it. Cancelling a finished job is a conflict; cancelling twice is harmless."""
    now = utcnow()
    if job.status == Status.queued:
        done = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == Status.queued)
            .values(status=Status.cancelled, cancel_requested=True, finished_at=now)
        )
        session.commit()
        if done.rowcount:
            session.refresh(job)
            return job
        session.refresh(job)  # a worker claimed it meanwhile: cancel the running job
    if job.status in TERMINAL:
        if job.status == Status.cancelled:
            return job
        raise Conflict(f"job {job.id} already {job.status}")
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_([Status.running, Status.cancelling]))
        .values(status=Status.cancelling, cancel_requested=True)
    )
    session.commit()
    session.refresh(job)
    return job


# --- the worker's side -------------------------------------------------------------------------


def _claimable(now: datetime) -> Any:
    expired = (Job.lease_expires_at < now) & Job.status.in_([Status.running, Status.cancelling])
    return or_(Job.status == Status.queued, expired)


def claim(
    session: Session, worker: str, lease_seconds: float, job_id: str | None = None
) -> Job | None:
    """Take one job (``job_id``, or the oldest claimable) with a fresh lease: a queued job, or
    one whose previous worker stopped renewing its lease. Jobs out of attempts, or whose
    cancellation was pending when their worker died, are settled here instead of run."""
    now = utcnow()
    query = select(Job.id, Job.attempts, Job.max_attempts, Job.cancel_requested, Job.status)
    query = query.where(_claimable(now)).order_by(Job.seq).limit(10)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    for row in session.execute(query).all():
        if row.cancel_requested:
            _settle(session, row.id, now, Status.cancelled, None)
            continue
        if row.attempts >= row.max_attempts:
            reason = (
                f"gave up after {row.attempts} attempts: the worker running it stopped "
                "(lease expired)"
            )
            _settle(session, row.id, now, Status.failed, reason)
            continue
        taken = session.execute(
            update(Job)
            .where(Job.id == row.id, Job.attempts == row.attempts, _claimable(now))
            .values(
                status=Status.running,
                attempts=row.attempts + 1,
                lease_owner=worker,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=now,
                error=None,
            )
        )
        session.commit()
        if taken.rowcount:
            return get_job(session, row.id)
    return None


def _settle(session: Session, job_id: str, now: datetime, status: Status, error: str | None):
    session.execute(
        update(Job)
        .where(Job.id == job_id, _claimable(now))
        .values(status=status, error=error, finished_at=now, lease_owner=None)
    )
    session.commit()


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learned: whether the lease is still ours and whether to stop."""

    owned: bool
    cancel: bool


def heartbeat(session: Session, job_id: str, worker: str, lease_seconds: float) -> Beat:
    now = utcnow()
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker, Job.status.not_in(list(TERMINAL)))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
    )
    session.commit()
    if not renewed.rowcount:
        return Beat(owned=False, cancel=False)
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return Beat(owned=True, cancel=bool(cancel))


def record(session: Session, job_id: str, worker: str, **values: Any) -> bool:
    """Progress or MLflow run id from the worker that owns the job."""
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker).values(**values)
    )
    session.commit()
    return bool(done.rowcount)


def finish(
    session: Session,
    job_id: str,
    worker: str,
    status: Status,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """The owning worker's last word. False if the lease had already passed to another."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker, Job.status.not_in(list(TERMINAL)))
        .values(
            status=status,
            result=result,
            error=error,
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    session.commit()
    return bool(done.rowcount)


def release(session: Session, job_id: str, worker: str) -> None:
    """Give a job back to the queue (the worker is shutting down): no attempt is spent."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker, Job.status == Status.running)
        .values(
            status=Status.queued,
            attempts=Job.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    session.commit()


def unfinished_queued(session: Session) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.status == Status.queued)))
