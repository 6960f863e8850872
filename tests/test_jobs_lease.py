"""The job state machine's worker side on the real PostgreSQL: claims, leases, attempts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy.orm import sessionmaker

from service import jobs
from service.db import Status, make_engine, make_sessions, migrate


@pytest.fixture(scope="module")
def sessions(pg_url: str) -> Iterator[sessionmaker]:
    migrate(pg_url)
    engine = make_engine(pg_url)
    yield make_sessions(engine)
    engine.dispose()


def new_job(sessions: sessionmaker, max_attempts: int = 2) -> str:
    with sessions() as session:
        job, _ = jobs.create_job(
            session, {"name": "lease-test"}, owner="t", max_attempts=max_attempts
        )
        return job.id


def claim(sessions: sessionmaker, worker: str, job_id: str, lease: float = 30.0):
    with sessions() as session:
        return jobs.claim(session, worker, lease, job_id)


def state(sessions: sessionmaker, job_id: str):
    with sessions() as session:
        return jobs.get_job(session, job_id)


def test_eight_workers_racing_for_one_job_one_wins(sessions):
    job_id = new_job(sessions)
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: claim(sessions, f"w{i}", job_id), range(8)))
    winners = [job for job in won if job is not None]
    assert len(winners) == 1
    job = state(sessions, job_id)
    assert job.status == Status.running and job.attempts == 1
    assert job.lease_owner == winners[0].lease_owner


def test_an_expired_lease_passes_the_job_on_until_attempts_run_out(sessions):
    job_id = new_job(sessions, max_attempts=2)
    assert claim(sessions, "first", job_id, lease=0.2).attempts == 1
    assert claim(sessions, "second", job_id) is None  # the lease still holds
    time.sleep(0.3)
    taken = claim(sessions, "second", job_id, lease=0.2)
    assert taken is not None and taken.attempts == 2 and taken.lease_owner == "second"
    with sessions() as session:
        # The first owner's late writes are refused: it no longer holds the lease.
        assert not jobs.heartbeat(session, job_id, "first", 30).owned
        assert not jobs.finish(session, job_id, "first", Status.succeeded)
    time.sleep(0.3)
    assert claim(sessions, "third", job_id) is None
    job = state(sessions, job_id)
    assert job.status == Status.failed
    assert job.error.startswith("gave up after 2 attempts")


def test_release_spends_no_attempt_and_heartbeat_carries_cancellation(sessions):
    job_id = new_job(sessions)
    claim(sessions, "w", job_id)
    with sessions() as session:
        jobs.release(session, job_id, "w")
    job = state(sessions, job_id)
    assert job.status == Status.queued and job.attempts == 0 and job.lease_owner is None
    claim(sessions, "w2", job_id)
    with sessions() as session:
        assert jobs.heartbeat(session, job_id, "w2", 30) == jobs.Beat(owned=True, cancel=False)
        jobs.request_cancel(session, jobs.get_job(session, job_id))
        assert jobs.heartbeat(session, job_id, "w2", 30) == jobs.Beat(owned=True, cancel=True)
        assert jobs.finish(session, job_id, "w2", Status.cancelled)
    assert state(sessions, job_id).status == Status.cancelled


def test_a_cancelling_job_whose_worker_died_ends_cancelled_not_rerun(sessions):
    job_id = new_job(sessions)
    claim(sessions, "w", job_id, lease=0.2)
    with sessions() as session:
        jobs.request_cancel(session, jobs.get_job(session, job_id))
    time.sleep(0.3)
    assert claim(sessions, "w2", job_id) is None
    job = state(sessions, job_id)
    assert job.status == Status.cancelled and job.attempts == 1
