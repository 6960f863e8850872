"""Fixtures for tests against the real PostgreSQL and Redis of the service.

Each test session gets its own database (created here, dropped at the end) and its own Redis key
prefix, so concurrent runs never see each other's jobs. The servers are found through
BYOL_TEST_POSTGRES (a libpq URL of a database to connect to for CREATE DATABASE) and
BYOL_TEST_REDIS. Where they do not answer the tests that need them are skipped, except under
CI (CI=true), where that is a failure: CI must not pass by testing nothing.

``settings(**overrides)`` builds Settings on them; ``api_server(settings)`` starts a real
uvicorn process of the API with those settings (``settings_env`` turns Settings into the
BYOL_* variables a subprocess needs).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from service.settings import Settings

POSTGRES = os.environ.get("BYOL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("BYOL_TEST_REDIS", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[1]


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} unavailable: {exc}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database for this test session."""
    yield from _fresh_database()


@pytest.fixture(scope="module")
def own_pg_url() -> Iterator[str]:
    """A fresh database for one module: end-to-end tests whose workers claim any queued job
    must not find the jobs other modules left queued in the session's database."""
    yield from _fresh_database()


def _fresh_database() -> Iterator[str]:
    name = f"byol_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES).set(drivername="postgresql+psycopg", database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        # FORCE: servers a test left running, or pooled connections, must not keep it alive
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    finally:
        client.close()
    return REDIS


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix (Settings.redis_prefix) of this test session; its keys go at the end."""
    prefix = f"byol-test-{secrets.token_hex(6)}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def settings(
    pg_url: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """``settings(**overrides)``: Settings on the session's database, Redis prefix and a
    temporary data root and runs folder; the environment's BYOL_* and .env are ignored."""
    base = tmp_path_factory.mktemp("service")
    data_root, runs_dir = base / "data", base / "runs"
    data_root.mkdir()
    runs_dir.mkdir()

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": pg_url,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "data_root": data_root,
            "runs_dir": runs_dir,
            "poll_seconds": 0.2,
        }
        values.update(overrides)
        return _isolated_settings(**values)

    return make


def _isolated_settings(**values: Any) -> Settings:
    # Only explicit values: a developer's BYOL_* variables must not leak into tests.
    names = [name for name in os.environ if name.upper().startswith("BYOL_")]
    saved = {name: os.environ.pop(name) for name in names}
    try:
        return Settings(_env_file=None, **values)
    finally:
        os.environ.update(saved)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the BYOL_* environment variables that reproduce it in a subprocess."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        env[f"BYOL_{name.upper()}"] = text
    return env


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that this session has not handed out yet: the kernel can give
    a port just closed to the next bind, and one Ray node given the same port for two of its
    components refuses to start (seen once in CI)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class ApiServer:
    """A ``uvicorn`` process serving ``service.app:create_app``."""

    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to clean up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """``api_server(settings, workers=1)`` starts a real uvicorn server and waits until it
    answers; every server started is stopped at the end of the test."""
    started: list[ApiServer] = []

    def start(settings: Settings, workers: int = 1) -> ApiServer:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BYOL_")}
        env.update(settings_env(settings))
        log = tmp_path / f"uvicorn-{port}.log"
        command = [
            sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning",
        ]  # fmt: skip
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        server = ApiServer(f"http://127.0.0.1:{port}", process, log)
        started.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"uvicorn exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"uvicorn did not answer within 30 s:\n{log.read_text()}")

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite store, local artifacts) for the tests of one module;
    yields its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """torch on two intra-op threads for the test, whatever the machine's count, then back."""
    import torch  # here, not at the top: the service's tests run without importing torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
