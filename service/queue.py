"""Redis: job dispatch on a stream read by a consumer group, and per-job progress events.

Redis is a fast path, never the record. A dispatch that fails (Redis down) or is lost (Redis
restarted empty) is repaired by workers, which also look for queued jobs in SQL when the stream
is quiet. Every call here degrades to "nothing happened" when Redis does not answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

GROUP = "workers"
EVENTS_KEPT = 1000  # per job: enough for every epoch of a long run, bounded memory


class Queue:
    def __init__(self, url: str, prefix: str = "byol") -> None:
        self.redis = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=1, socket_timeout=5
        )
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    def dispatch(self, *job_ids: str) -> bool:
        """Announce queued jobs to the workers, in one round trip. False when Redis is
        unreachable."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.xadd(self.stream, {"job": job_id}, maxlen=10_000, approximate=True)
                pipe.execute()
            return True
        except RedisError as exc:
            log.warning(
                "dispatch of %s not sent (workers will find them in SQL): %s",
                ", ".join(job_ids),
                exc,
            )
            return False

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def receive(self, consumer: str, block_ms: int) -> list[str]:
        """Job ids announced since this group last read, acknowledged at once: a lost message
        costs nothing because SQL, not the stream, says what is queued."""
        for _ in range(2):
            try:
                reply = self.redis.xreadgroup(
                    GROUP, consumer, {self.stream: ">"}, count=10, block=block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ensure_group()  # first use, or Redis restarted empty
                continue
            except RedisError:
                return []
            ids = [(mid, fields["job"]) for _, messages in reply or [] for mid, fields in messages]
            if ids:
                self.redis.xack(self.stream, GROUP, *[mid for mid, _ in ids])
            return [job for _, job in ids]
        return []

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        try:
            self.redis.xadd(
                self.events_key(job_id),
                {"data": json.dumps(event)},
                maxlen=EVENTS_KEPT,
                approximate=True,
            )
            self.redis.expire(self.events_key(job_id), 7 * 24 * 3600)
        except RedisError as exc:
            log.warning("event for job %s not published: %s", job_id, exc)

    def events(
        self, job_id: str, after: str = "0", block_ms: int = 1000
    ) -> Iterator[tuple[str, dict]]:
        """Events after ``after`` (a stream id), waiting up to ``block_ms`` for the first."""
        reply = self.redis.xread({self.events_key(job_id): after}, block=block_ms, count=100)
        for _, messages in reply or []:
            for mid, fields in messages:
                yield mid, json.loads(fields["data"])
