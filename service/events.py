"""A job's state as a stream: the current state from SQL, then what the worker publishes on
the job's Redis stream, until the job finishes.

Ordering: the position of the Redis stream's tail is taken *before* SQL is read, and reading
resumes from it, so an event published while SQL is being read is delivered (perhaps once more
than needed) rather than lost. SQL stays the truth: when Redis is quiet the job is looked up
again, which ends the stream of a job that finished without a last event (cancelled while
queued, its worker killed); when Redis does not answer the stream degrades to polling SQL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.db import TERMINAL, Job
from service.schemas import JobEvent
from service.views import job_event, worker_event

log = logging.getLogger(__name__)

Loader = Callable[[], Awaitable[Job | None]]


async def stream_tail(redis: Redis, key: str) -> str | None:
    """The id of the newest event (``0`` for none yet); None when Redis does not answer."""
    try:
        newest = await redis.xrevrange(key, count=1)
    except RedisError as exc:
        log.warning("events of %s: Redis unavailable, polling SQL (%s)", key, exc)
        return None
    return newest[0][0] if newest else "0"


def _decode(fields: dict) -> object:
    try:
        return json.loads(fields.get("data", ""))
    except (TypeError, ValueError):
        return None


async def job_events(
    job_id: str,
    load: Loader,
    redis: Redis,
    key: str,
    *,
    poll_seconds: float,
) -> AsyncIterator[JobEvent]:
    """``poll_seconds``: how long to wait on a quiet Redis, or between SQL polls without it,
    before SQL is consulted again."""
    block_ms = max(1, int(poll_seconds * 1000))
    cursor = await stream_tail(redis, key)
    job = await load()
    if job is None:
        return
    sent = job_event(job)
    yield sent
    while sent.status not in TERMINAL:
        if cursor is not None:
            try:
                reply = await redis.xread({key: cursor}, block=block_ms, count=100)
            except RedisError as exc:
                log.warning("events of job %s: Redis lost, polling SQL (%s)", job_id, exc)
                cursor = None
                continue
            delivered = False
            for _, messages in reply or []:
                for message_id, fields in messages:
                    cursor = message_id
                    event = worker_event(job_id, _decode(fields))
                    if event is None:
                        continue
                    delivered = True
                    sent = event
                    yield event
                    if event.status in TERMINAL:
                        return
            if delivered:
                continue
        else:
            await anyio.sleep(poll_seconds)
        job = await load()
        if job is None:
            return
        fresh = job_event(job)
        # With Redis, SQL may lag the worker's events: only its final word is news. Polling,
        # every change is.
        if fresh != sent and (cursor is None or fresh.status in TERMINAL):
            sent = fresh
            yield fresh
