"""What the endpoints share, built once in the app's lifespan and found on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from service.intake import Intake
from service.queue import Queue
from service.settings import Settings


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    queue: Queue
    intake: Intake
    events_redis: AsyncRedis
    mlflow_ui: str | None
    data_root: Path  # resolved once: it does not move while the service runs


# async: a plain attribute read, not worth a trip through the threadpool
async def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]
