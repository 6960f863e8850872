"""Queued -> running delay for an idle worker: POST /jobs to a real API, a `byol worker` already
up (Ray started, so Ray's start-up is excluded), and the time until the job's row says running.

Each job is cancelled as soon as it runs, and the next one is posted once the worker is idle
again. Uses a fresh PostgreSQL database and a private Redis key prefix. Writes
docs/benchmark-dispatch.md.

    python -m benchmarks.dispatch_delay [--jobs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import select

from service.db import Job, make_engine, make_sessions

ADMIN = os.environ.get("BYOL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TOKEN = secrets.token_hex(8)
TINY = {
    "epochs": 50,
    "batch_size": 64,
    "data": {"train_limit": 256, "eval_limit": 200},
    "model": {"encoder": {"width": 8}},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(predicate, timeout: float, every: float = 0.002):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", default="docs/benchmark-dispatch.md")
    args = parser.parse_args()

    name = f"byol_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="byol-dispatch-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOL_")}
    env.update(
        BYOL_DATABASE_URL=url,
        BYOL_REDIS_PREFIX=f"byol-bench-{secrets.token_hex(4)}",
        BYOL_API_TOKENS=json.dumps({"bench": TOKEN}),
        BYOL_DATA_ROOT=str(tmp),
        BYOL_RUNS_DIR=str(tmp / "runs"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
    )
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
         "--port", str(port), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    log = (tmp / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "byol_core.cli", "worker"], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    sessions = make_sessions(make_engine(url))
    delays: list[float] = []
    try:
        wait(lambda: _answers(http), 60, 0.1)
        wait(lambda: b"ready" in (tmp / "worker.log").read_bytes(), 120, 0.1)
        spec = {**TINY, "data": {**TINY["data"], "root": str(tmp)}}
        for i in range(args.jobs + 1):
            posted = time.perf_counter()  # before the POST: its own latency counts too
            response = http.post("/jobs", json={**spec, "name": f"bench-{i}"})
            response.raise_for_status()
            job_id = response.json()["id"]
            wait(lambda j=job_id: _status(sessions, j) != "queued", 30)
            if i:  # the first job warms MLflow's store up
                delays.append(time.perf_counter() - posted)
            http.post(f"/jobs/{job_id}/cancel").raise_for_status()
            wait(lambda j=job_id: _status(sessions, j) == "cancelled", 60, 0.05)
            time.sleep(0.5)  # idle again, blocked on the stream
    finally:
        http.close()
        for proc in (worker, api):
            proc.terminate()
            proc.wait(60)
        sessions.kw["bind"].dispose()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    ms = sorted(d * 1000 for d in delays)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    text = f"""# Queued -> running delay for an idle worker

{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, {platform.processor() or platform.machine()},
Python {platform.python_version()}; PostgreSQL and Redis on localhost; a uvicorn API and one
`byol worker` with Ray already started (`python -m benchmarks.dispatch_delay --jobs {args.jobs}`).
Delay = from sending POST /jobs to the job's row saying `running`, {len(ms)} jobs.

| p50 ms | p99 ms | max ms |
|---:|---:|---:|
| {p50:.1f} | {p99:.1f} | {ms[-1]:.1f} |

Target: <= 1000 ms. The worker blocks on the Redis stream (XREADGROUP), so a POST's dispatch
message wakes it at once; the claim is one conditional UPDATE. Without Redis the worker finds
the job by polling SQL every `BYOL_POLL_SECONDS` (default 2 s), which bounds the delay then.
"""
    Path(args.out).write_text(text)
    print(text)


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def _status(sessions, job_id: str) -> str:
    with sessions() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


if __name__ == "__main__":
    main()
