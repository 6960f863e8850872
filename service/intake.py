"""Job creation with group commit.

POST /jobs requests that arrive while one batch is being written wait for the next, which
writes them all with one INSERT, one COMMIT and one Redis round trip. A request alone is a batch
of one and waits for nothing; under load a request's share of the database work, the commit's
WAL flush and the thread hand-off shrinks with the batch. A request is answered only after its
batch committed, so an answered job is stored, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from service import jobs
from service.db import Job
from service.queue import Queue

log = logging.getLogger(__name__)

Outcome = tuple[Job, bool] | jobs.Conflict


class Intake:
    def __init__(
        self, sessions: sessionmaker, queue: Queue, *, max_attempts: int, max_batch: int = 128
    ) -> None:
        self.sessions = sessions
        self.queue = queue
        self.max_attempts = max_attempts
        self.max_batch = max_batch
        # One thread, so batches are written one after another and the next one fills meanwhile.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="byol-intake")
        self._waiting: list[tuple[jobs.NewJob, asyncio.Future[Outcome]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def create(self, new: jobs.NewJob) -> tuple[Job, bool]:
        """(job, created) once the job is committed; raises Conflict for a key used before
        with another spec, and the database's error when the batch could not be written."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((new, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        outcome = await future
        if isinstance(outcome, jobs.Conflict):
            raise outcome
        return outcome

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
        self._thread.shutdown()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            futures = [future for _, future in batch]
            try:
                outcomes = await loop.run_in_executor(
                    self._thread, self._write, [new for new, _ in batch]
                )
            except Exception as exc:
                outcomes = [exc] * len(batch)
            except BaseException:
                # cancelled (the loop is closing): nobody may wait forever
                gone = ConnectionAbortedError("the server is shutting down")
                _settle(futures, [gone] * len(batch))
                raise
            _settle(futures, outcomes)

    def _write(self, batch: Sequence[jobs.NewJob]) -> list[Outcome | Exception]:
        try:
            outcomes: list[Outcome | Exception] = list(self._insert(batch))
        except OperationalError:
            raise  # the database is away: every request of the batch gets the 503
        except Exception:
            if len(batch) == 1:
                raise
            # One request's row was refused (a value the database will not take): alone,
            # each request gets its own answer and the others are not held back by it.
            log.warning("a batch of %d new jobs failed; writing them one by one", len(batch))
            outcomes = [self._one(new) for new in batch]
        created = [o[0].id for o in outcomes if isinstance(o, tuple) and o[1]]
        if created:
            self.queue.dispatch(*created)
        return outcomes

    def _insert(self, batch: Sequence[jobs.NewJob]) -> list[Outcome]:
        with self.sessions() as session:
            return jobs.create_jobs(session, batch, max_attempts=self.max_attempts)

    def _one(self, new: jobs.NewJob) -> Outcome | Exception:
        try:
            (outcome,) = self._insert([new])
            return outcome
        except Exception as exc:
            return exc


def _settle(
    futures: Sequence[asyncio.Future[Outcome]], outcomes: Sequence[Outcome | Exception]
) -> None:
    for future, outcome in zip(futures, outcomes, strict=True):
        if future.done():  # the request went away; its job is stored all the same
            continue
        if isinstance(outcome, Exception) and not isinstance(outcome, jobs.Conflict):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
