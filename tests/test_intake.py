"""Group commit of new jobs (service.intake) on the real PostgreSQL and Redis: concurrent
creations share INSERTs, each still gets its own answer, and one bad row or a dead database is
reported to exactly the requests it concerns."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from service import jobs
from service.db import Job, as_utc, make_engine, make_sessions, migrate
from service.intake import Intake
from service.queue import Queue


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """The production database and the embedded default: their INSERTs are spelled apart."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('intake') / 'jobs.db'}"
    migrate(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def queue(redis_url: str, redis_prefix: str) -> Iterator[Queue]:
    queue = Queue(redis_url, f"{redis_prefix}:intake-{secrets.token_hex(4)}")
    yield queue
    queue.redis.delete(queue.stream)
    queue.redis.close()


def inserts_into_jobs(engine: Engine) -> list[int]:
    """A list that grows by one for each INSERT INTO jobs the engine sends."""
    seen: list[int] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            seen.append(1)

    return seen


def run(intake: Intake, news: list[jobs.NewJob]) -> list[Any]:
    """Every creation at once, as concurrent requests make them; outcomes or exceptions."""

    async def all_at_once() -> list[Any]:
        try:
            return await asyncio.gather(*(intake.create(n) for n in news), return_exceptions=True)
        finally:
            await intake.close()

    return asyncio.run(all_at_once())


def spec(name: str) -> dict[str, Any]:
    return {"name": name, "epochs": 1}


def test_concurrent_creations_share_inserts_and_each_gets_its_own_job(engine, queue):
    tag = secrets.token_hex(4)
    inserts = inserts_into_jobs(engine)
    news = [jobs.NewJob(spec(f"intake-{tag}-{i}"), "alice", f"{tag}-{i}") for i in range(40)]
    outcomes = run(Intake(make_sessions(engine), queue, max_attempts=3), news)

    assert all(created for _, created in outcomes)
    assert [job.name for job, _ in outcomes] == [n.spec["name"] for n in news]
    assert len({job.id for job, _ in outcomes}) == 40
    # the first request was written alone; the 39 that arrived meanwhile went together
    assert len(inserts) < 40, len(inserts)
    with make_sessions(engine)() as session:
        stored = session.scalars(select(Job).where(Job.name.like(f"intake-{tag}-%"))).all()
    assert {job.id for job in stored} == {job.id for job, _ in outcomes}
    assert all(job.status == "queued" and job.owner == "alice" for job in stored)
    dispatched = [fields["job"] for _, fields in queue.redis.xrange(queue.stream)]
    assert sorted(dispatched) == sorted(job.id for job, _ in outcomes)


def test_a_stored_row_is_the_job_the_request_was_answered_with(engine):
    tag = secrets.token_hex(4)
    document = {
        "name": f"intake-{tag}-row",
        "epochs": 2,
        "optim": {"lr": 0.2, "tau": 0.99609375, "decay": 1e-6, "steps": None},
        "note": 'crème brûlée "quoted" \\ 𝛕',  # non-ASCII, escapes, beyond the BMP
        "grid": [1, [2.5, True], {"z": "last", "a": "first"}],
    }
    news = [
        jobs.NewJob(document, "alice", f"{tag}-row"),
        jobs.NewJob(spec(f"intake-{tag}-nokey"), "bob"),  # no idempotency key: NULL
    ]
    with make_sessions(engine)() as session:
        outcomes = jobs.create_jobs(session, news, max_attempts=5)
    columns = [c.key for c in Job.__table__.columns]
    for (answered, created), new in zip(outcomes, news, strict=True):
        assert created
        with make_sessions(engine)() as session:
            stored = jobs.get_job(session, answered.id)
            assert stored is not None
            for column in columns:
                if column == "seq":
                    continue
                mine, theirs = getattr(answered, column), getattr(stored, column)
                if column.endswith("_at") and theirs is not None:
                    theirs = as_utc(theirs)
                assert mine == theirs, column
        assert stored.spec == new.spec and list(stored.spec) == list(new.spec)
        assert (stored.status, stored.attempts, stored.max_attempts) == ("queued", 0, 5)
        assert stored.cancel_requested is False and stored.idempotency_key == new.idempotency_key


def test_postgresql_writes_every_batch_with_one_statement_text(pg_url):
    # one text for every batch size: psycopg parses it once and the server prepares it
    migrate(pg_url)
    engine = make_engine(pg_url)
    texts: set[str] = set()

    @event.listens_for(engine, "before_cursor_execute")
    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            texts.add(statement)

    tag = secrets.token_hex(4)
    try:
        for size in (1, 3, 16):
            news = [jobs.NewJob(spec(f"intake-{tag}-{size}-{i}"), "alice") for i in range(size)]
            with make_sessions(engine)() as session:
                outcomes = jobs.create_jobs(session, news, max_attempts=3)
            assert [job.name for job, _ in outcomes] == [n.spec["name"] for n in news]
    finally:
        engine.dispose()
    assert len(texts) == 1, texts


def test_one_key_twice_in_a_batch_is_one_job_and_another_spec_under_it_a_conflict(engine, queue):
    tag = secrets.token_hex(4)
    key = f"{tag}-key"
    news = [
        jobs.NewJob(spec(f"intake-{tag}-first"), "alice", "warm-up-" + tag),
        jobs.NewJob(spec(f"intake-{tag}"), "alice", key),
        jobs.NewJob(spec(f"intake-{tag}"), "alice", key),
        jobs.NewJob(spec(f"intake-{tag}-other"), "alice", key),
        jobs.NewJob(spec(f"intake-{tag}"), "bob", key),  # keys are per user
    ]
    first, created, retried, other, bobs = run(
        Intake(make_sessions(engine), queue, max_attempts=3), news
    )
    assert first[1] and created[1] and bobs[1]
    assert retried == (retried[0], False) and retried[0].id == created[0].id
    assert isinstance(other, jobs.Conflict)
    with make_sessions(engine)() as session:
        count = session.scalar(select(func.count()).where(Job.idempotency_key == key))
    assert count == 2  # alice's and bob's
    dispatched = [fields["job"] for _, fields in queue.redis.xrange(queue.stream)]
    assert sorted(dispatched) == sorted([first[0].id, created[0].id, bobs[0].id])


def test_a_row_the_database_refuses_fails_its_request_alone(pg_url, queue):
    # PostgreSQL enforces the column's length; SQLite stores any length
    migrate(pg_url)
    engine = make_engine(pg_url)
    tag = secrets.token_hex(4)
    news = [jobs.NewJob(spec(f"intake-{tag}-{i}"), "alice", f"{tag}-{i}") for i in range(6)]
    news[3] = jobs.NewJob(spec("x" * 300), "alice", f"{tag}-long")  # jobs.name is 200 long
    outcomes = run(Intake(make_sessions(engine), queue, max_attempts=3), news)

    assert isinstance(outcomes[3], DBAPIError) and "too long" in str(outcomes[3])
    good = [o for i, o in enumerate(outcomes) if i != 3]
    assert all(isinstance(o, tuple) and o[1] for o in good), outcomes
    with make_sessions(engine)() as session:
        names = set(session.scalars(select(Job.name).where(Job.name.like(f"intake-{tag}-%"))))
    engine.dispose()
    assert names == {n.spec["name"] for i, n in enumerate(news) if i != 3}


def test_a_database_that_does_not_answer_fails_every_request_of_the_batch(queue):
    dead = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    try:
        news = [jobs.NewJob(spec(f"dead-{i}"), "alice") for i in range(5)]
        outcomes = run(Intake(make_sessions(dead), queue, max_attempts=3), news)
    finally:
        dead.dispose()
    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes
    assert queue.redis.xlen(queue.stream) == 0
