"""Every setting of the service and the job worker, from ``BYOL_*`` environment variables.

The defaults are the embedded ones (SQLite file, local Redis, run folders under ./runs), so one
machine needs no configuration; a deployment sets the variables (see ``.env.example``). Settings
are validated once at start-up, and a bad value stops the process with one line naming it.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pydantic_settings
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BYOL_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///byol-service.db",
        description="SQLAlchemy URL; PostgreSQL in production (postgresql+psycopg://user@host/db).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Dispatch and events.")
    redis_prefix: str = Field(
        "byol", description="Key prefix, so several services share one Redis."
    )
    data_root: Path = Field(
        Path("data"),
        description="Datasets a job may read: its data.root and data.path must lie inside.",
    )
    runs_dir: Path = Field(
        Path("runs"), description="Job run folders (shared storage on a cluster)."
    )
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description='Bearer tokens by user, as JSON: {"alice": "s3cret"}. Creating and '
        "cancelling jobs needs one.",
    )
    admins: list[str] = Field(
        default_factory=list, description="Users who may cancel anyone's job (JSON list)."
    )
    max_body_bytes: int = Field(64 * 1024, gt=0, description="Larger request bodies get 413.")
    api_concurrency: int = Field(
        16,
        gt=0,
        description="Reading and cancelling requests one API process serves at once (its "
        "threadpool), each holding at most one database connection; further requests wait "
        "their turn. New jobs do not count: they are written in batches, one connection at a time.",
    )
    max_attempts: int = Field(3, gt=0, description="Runs of a job before it fails for good.")
    lease_seconds: float = Field(
        15.0, gt=0, description="A worker that misses heartbeats this long loses its job."
    )
    poll_seconds: float = Field(
        2.0, gt=0, description="How often an idle worker looks in SQL for work Redis missed."
    )
    mlflow_ui_url: str | None = Field(
        None,
        description="Base URL of the MLflow UI for job links (default: the tracking URI "
        "when it is http).",
    )

    def mlflow_ui(self) -> str | None:
        """Base URL for links to MLflow runs: the setting, else an http tracking URI."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        return tracking.rstrip("/") if tracking.startswith(("http://", "https://")) else None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// URL")
        return url


class SettingsError(ValueError):
    """A setting from the environment is invalid; the message names the variable."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "BYOL_" + "_".join(str(p) for p in first["loc"][:1]).upper()
        raise SettingsError(f"{name}: {first['msg']}") from None
    except pydantic_settings.SettingsError as exc:
        # A JSON-valued variable (BYOL_API_TOKENS, BYOL_ADMINS) that does not parse fails in
        # pydantic-settings itself, before validation, with the field only in its message.
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"BYOL_{field.group(1).upper()}" if field else "BYOL_*"
        cause = exc.__cause__
        reason = f"must be JSON ({cause})" if isinstance(cause, json.JSONDecodeError) else exc
        raise SettingsError(f"{name}: {reason}") from None


@lru_cache
def get_settings() -> Settings:
    """The process's settings. A bad value ends the process with one line naming the
    variable: the API's factory calls this inside uvicorn, which would otherwise print a
    traceback."""
    try:
        return load_settings()
    except SettingsError as exc:
        raise SystemExit(f"byol: error: {exc}") from None
