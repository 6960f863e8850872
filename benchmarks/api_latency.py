"""POST /jobs latency against a real uvicorn server on PostgreSQL and Redis.

    .venv/bin/python -m benchmarks.api_latency                  # 1 and 2 server processes
    .venv/bin/python -m benchmarks.api_latency --workers 2 --duration 30

Each request is what ``byol submit`` sends: a fully resolved spec (about 1.6 kB of JSON) with a
fresh Idempotency-Key and a bearer token. Two loads:

* closed loop: ``--clients`` connections, each sending its next request as soon as the previous
  answer arrives (the busiest 32 clients can make the server);
* open loop: requests at a fixed rate over the same connections, latency counted from when
  each request was due, so a stalled server cannot hide its queue (no coordinated omission).

The load generator is a minimal asyncio HTTP/1.1 client, so that on a small machine it takes as
little CPU from the server as possible. The benchmark creates its own database (dropped at the
end) and Redis prefix (deleted at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from byol_core.presets import resolve_spec

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("BYOL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("BYOL_TEST_REDIS", "redis://127.0.0.1:6379/0")
TOKEN = "bench-token-0123456789abcdef"


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"byol_bench_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(POSTGRES).set(drivername="postgresql+psycopg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    process: subprocess.Popen
    port: int

    def pids(self) -> list[int]:
        """The uvicorn supervisor and its worker processes."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        kids = [int(p) for p in children.read_text().split()] if children.exists() else []
        return [self.process.pid, *kids]


def _process_cpu(pid: int) -> tuple[str, float]:
    """(command name, user + system CPU seconds) of a process; ("", 0) if it is gone."""
    try:
        name, rest = Path(f"/proc/{pid}/stat").read_text().split(" (", 1)[1].rsplit(")", 1)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "", 0.0
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_party(server: Server) -> dict[str, float]:
    """CPU seconds used so far by the server, PostgreSQL, Redis, this load generator and
    everything else on the machine (other people's work skews every figure: this says how
    much)."""
    server_pids = set(server.pids())
    parties = dict.fromkeys(PARTIES, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        name, seconds = _process_cpu(pid)
        if pid in server_pids:
            parties["server"] += seconds
        elif name.startswith("postgres"):
            parties["postgres"] += seconds
        elif name.startswith("redis-server"):
            parties["redis"] += seconds
        elif pid == os.getpid():
            parties["load generator"] += seconds
    busy = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system (idle iowait excluded) irq softirq steal
    total = sum(int(x) for i, x in enumerate(busy[:8]) if i not in (3, 4))
    parties["other"] = total / os.sysconf("SC_CLK_TCK") - sum(parties.values())
    return parties


PARTIES = ("server", "postgres", "redis", "load generator", "other")


@contextmanager
def serve(
    env: dict[str, str], workers: int, port: int, loop: str = "auto", http: str = "auto"
) -> Iterator[Server]:
    command = [
        sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--loop", loop, "--http", http, "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        # every worker process must have started (and migrated) before the clock starts
        time.sleep(1.0 if workers > 1 else 0)
        yield Server(process, port)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


class Connection:
    """One keep-alive HTTP/1.1 connection that sends POST /jobs and reads the answer."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port = port
        self.body = body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self) -> int:
        assert self.reader and self.writer
        head = (
            f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nIdempotency-Key: {uuid.uuid4()}\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + self.body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@dataclass
class Run:
    label: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | str]:
        ms = sorted(x * 1000 for x in self.latencies)
        q = statistics.quantiles(ms, n=100, method="inclusive")
        return {
            "load": self.label,
            "requests": len(ms),
            "errors": self.errors,
            "throughput": round(len(ms) / self.seconds, 1),
            "p50_ms": round(q[49], 1),
            "p90_ms": round(q[89], 1),
            "p99_ms": round(q[98], 1),
            "max_ms": round(ms[-1], 1),
            "cpu_ms_per_request": {
                party: round(1000 * seconds / len(ms), 2)
                for party, seconds in self.cpu.items()
                if party != "other"
            },
            "other_work_cores": round(self.cpu.get("other", 0.0) / self.seconds, 2),
        }


async def closed_loop(connections: list[Connection], seconds: float, run: Run) -> None:
    stop = time.perf_counter() + seconds

    async def client(conn: Connection) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            status = await conn.post()
            run.latencies.append(time.perf_counter() - start)
            run.errors += status != 201

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    run.seconds = time.perf_counter() - started


async def open_loop(connections: list[Connection], rate: float, seconds: float, run: Run) -> None:
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in connections:
        idle.put_nowait(conn)

    async def one(due: float) -> None:
        conn = await idle.get()
        try:
            status = await conn.post()
        finally:
            idle.put_nowait(conn)
        run.latencies.append(time.perf_counter() - due)  # from when it was due
        run.errors += status != 201

    tasks = []
    started = time.perf_counter()
    for n in range(int(rate * seconds)):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    run.seconds = time.perf_counter() - started


async def ramp_up(connections: list[Connection], interval: float, warmup: float) -> None:
    """Clients join one at a time, each posting as soon as it is connected, as a load tester
    ramps up its users; the warm-up runs on after the last has joined. (Opened all at once
    while the server is idle, the connections go to its processes unevenly: 11 and 21 of 32
    in every run here, while one by one gave 13–16 and 16–19.)"""
    stop = time.perf_counter() + interval * len(connections) + warmup
    clients = []
    for conn in connections:
        await conn.open()
        clients.append(
            asyncio.create_task(closed_loop([conn], stop - time.perf_counter(), Run("")))
        )
        await asyncio.sleep(interval)
    await asyncio.gather(*clients)


def connection_split(server: Server) -> list[int] | None:
    """How many of the clients' connections each server process holds (None without ss)."""
    try:
        listing = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{server.port} )"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    held = Counter(re.findall(r"pid=(\d+)", listing))
    return sorted(held.values())


async def measure(server: Server, body: bytes, args: argparse.Namespace) -> list[dict]:
    connections = [Connection(server.port, body) for _ in range(args.clients)]
    try:
        await ramp_up(connections, args.ramp, args.warmup)
        split = connection_split(server)
        print(f"connections per server process: {split}", file=sys.stderr, flush=True)
        results = []
        loads = [("closed", None)] + [("open", rate) for rate in args.rates]
        for kind, rate in loads:
            if kind == "closed":
                run = Run(f"closed loop, {args.clients} clients")
            else:
                run = Run(f"open loop, {rate:g} req/s over {args.clients} connections")
            before = cpu_by_party(server)
            if rate is None:
                await closed_loop(connections, args.duration, run)
            else:
                await open_loop(connections, rate, args.duration, run)
            after = cpu_by_party(server)
            run.cpu = {party: after[party] - before[party] for party in PARTIES}
            results.append({**run.summary(), "connections_per_process": split})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        return results
    finally:
        for conn in connections:
            conn.close()


def stage_costs(database_url: str, prefix: str, body: bytes, repeat: int = 400) -> dict:
    """CPU milliseconds (median, this thread) of each step of POST /jobs, run in-process one
    request at a time: what the server's CPU per request is spent on."""
    from service import admission, jobs
    from service.db import make_engine, make_sessions, migrate
    from service.queue import Queue
    from service.schemas import JobDetail
    from service.submit_route import SPECS
    from service.views import job_detail

    migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    queue = Queue(REDIS, prefix)
    root = admission.resolved(json.loads(body)["data"]["root"])
    timings: dict[str, list[float]] = {}

    def timed(stage: str, fn, *a, **kw):
        start = time.thread_time()
        out = fn(*a, **kw)
        timings.setdefault(stage, []).append(1000 * (time.thread_time() - start))
        return out

    def insert(document: dict):
        with sessions() as session:
            return jobs.create_job(
                session, document, owner="bench", max_attempts=3, idempotency_key=str(uuid.uuid4())
            )[0]

    for _ in range(repeat):
        spec = timed("validate the body's JSON as a JobSpec", SPECS.validate_json, body)
        document = timed("dump spec (mode=json)", spec.model_dump, mode="json")
        text = timed("canonical JSON", jobs.canonical, document)
        timed("admission (paths, text)", admission.problems, spec, document, root, text)
        job = timed("SQL insert, one job alone (psycopg)", insert, document)
        timed("Redis XADD dispatch, one job alone", queue.dispatch, job.id)
        view = timed("build JobDetail", job_detail, job, None)
        timed("serialize response", JobDetail.model_dump_json, view)
    # Under load the server writes new jobs in batches (service.intake): a job's share of one.
    for _ in range(repeat // 16):
        batch = [jobs.NewJob(document, "bench", str(uuid.uuid4())) for _ in range(16)]
        start = time.thread_time()
        with sessions() as session:
            created = jobs.create_jobs(session, batch, max_attempts=3)
        queue.dispatch(*[job.id for job, _ in created])
        per_job = 1000 * (time.thread_time() - start) / len(batch)
        timings.setdefault("SQL insert + XADD, a 16th of a batch", []).append(per_job)
    engine.dispose()
    queue.redis.close()
    return {stage: round(statistics.median(ms), 3) for stage, ms in timings.items()}


def uvicorn_stack(loop: str, http: str) -> str:
    """What uvicorn's ``auto`` picks: uvloop and httptools when they are installed."""
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"--loop {loop} --http {http}"


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with psycopg.connect(POSTGRES) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"PostgreSQL {pg} (synchronous_commit={sync}), Redis {redis_version()}, all local"
    )


def redis_version() -> str:
    client = redis.Redis.from_url(REDIS)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="uvicorn worker counts to compare")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--ramp", type=float, default=0.02, help="seconds between clients joining")
    parser.add_argument(
        "--rates", default="100,200", help="open-loop request rates (req/s), comma-separated"
    )
    parser.add_argument("--loop", default="auto", help="uvicorn --loop: auto, asyncio, uvloop")
    parser.add_argument("--http", default="auto", help="uvicorn --http: auto, h11, httptools")
    args = parser.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]

    prefix = f"byol-bench-{secrets.token_hex(4)}"
    data_root = Path(tempfile.mkdtemp(prefix="byol-bench-"))
    spec = resolve_spec(variant="byol").model_dump(mode="json")
    spec["data"]["root"] = str(data_root)
    body = json.dumps(spec).encode()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "body_bytes": len(body),
        "uvicorn": uvicorn_stack(args.loop, args.http),
        "load_average_before": os.getloadavg()[0],
        "runs": {},
    }
    try:
        with scratch_database() as database_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("BYOL_")}
            env.update(
                BYOL_DATABASE_URL=database_url,
                BYOL_REDIS_URL=REDIS,
                BYOL_REDIS_PREFIX=prefix,
                BYOL_DATA_ROOT=str(data_root),
                BYOL_API_TOKENS=json.dumps({"bench": TOKEN}),
            )
            report["stage_cpu_ms"] = stage_costs(database_url, prefix, body)
            print(json.dumps(report["stage_cpu_ms"]), file=sys.stderr, flush=True)
            for workers in [int(w) for w in args.workers.split(",")]:
                port = 18000 + workers
                with serve(env, workers, port, args.loop, args.http) as server:
                    print(f"{workers} server process(es)", file=sys.stderr, flush=True)
                    report["runs"][workers] = asyncio.run(measure(server, body, args))
    finally:
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    # Other work on the machine skews every figure: say how busy it was.
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
