"""The service end to end, as it runs in production: a uvicorn API, `byol worker` processes on
a local Ray cluster, the real PostgreSQL, a real Redis server and a real MLflow server.

Redis here is a private `redis-server` on a free port, so that one test can restart it empty
without disturbing anything else on the machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from byol_core.presets import deep_merge
from tests.conftest import free_port, settings_env

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")

TOKEN = "e2e-token"
TINY = {
    "epochs": 2,
    "batch_size": 64,
    "data": {"train_limit": 256, "eval_limit": 200},
    "model": {
        "encoder": {"width": 8},
        "projector": {"hidden_dim": 64},
        "predictor": {"hidden_dim": 64},
        "projection_dim": 32,
    },
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.folder),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        for _ in range(100):
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def service(settings, own_pg_url, private_redis, mlflow_server, api_server, tmp_path):
    """The API plus a way to start workers, all on one settings object."""
    config = settings(
        database_url=own_pg_url,
        redis_url=private_redis.url,
        api_tokens={"alice": TOKEN},
        lease_seconds=4.0,
        poll_seconds=0.5,
        mlflow_ui_url=mlflow_server,
    )
    api = api_server(config)
    workers: list[subprocess.Popen] = []

    def start_worker(*args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BYOL_")}
        env.update(settings_env(config), MLFLOW_TRACKING_URI=mlflow_server)
        log = (tmp_path / f"worker-{len(workers)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "byol_core.cli", "worker", *args],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the worker and the Ray cluster it starts, killable as one
        )
        workers.append(proc)
        return proc

    yield api.url, start_worker, config.data_root
    for proc in workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def submit(url: str, data_root: Path, spec: dict) -> dict:
    # Relative dataset paths are the service's business; an absolute one inside its data root
    # is what a user of a shared deployment writes.
    body = deep_merge(deep_merge(TINY, {"data": {"root": str(data_root)}}), spec)
    response = httpx.post(f"{url}/jobs", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(url: str, job_id: str, done: Callable[[dict], bool], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()
        if done(job):
            return job
        time.sleep(0.25)
    pytest.fail(f"job {job_id} never reached the expected state; last seen: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def ray_train_workers(session: int) -> list[int]:
    """Ray Train worker processes of the Ray cluster a `byol worker` started (they share its
    session): other Ray runs on the machine must not count."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if "ray::RayTrainWorker" in line and int(line.split()[1]) == session
    ]


def test_a_job_runs_from_post_to_succeeded_with_its_curves_in_mlflow(service, mlflow_server):
    url, start_worker, root = service
    job = submit(url, root, {"name": "lifecycle"})
    assert job["status"] == "queued"
    start_worker()
    running = wait_for(url, job["id"], lambda j: j["status"] != "queued")
    assert running["status"] in ("running", "succeeded"), running
    done = wait_for(url, job["id"], finished)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["progress"]["epoch"] == 2 and done["progress"]["epochs"] == 2
    assert done["result"]["linear_top1"] is not None

    client = MlflowClient(mlflow_server)
    run = client.get_run(done["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, "eval/linear_top1")]
    assert steps == [1, 2]
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/curves.png" in figures
    link = done["mlflow"]["url"]
    assert link == f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def test_reproduce_runs_as_a_sweep_job_with_its_trials_in_the_api_and_mlflow(
    service, mlflow_server, tmp_path
):
    """`byol reproduce --service`: the study's grid as one sweep job; trials in GET /jobs/{id},
    parent and child runs in MLflow, and the table fetched back from the sweep's run."""
    url, start_worker, root = service
    start_worker()
    out = tmp_path / "repro"
    tiny = [
        "--data", "shapes", "--epochs", "2", "--set", f"data.root={root}",
        "--set", "batch_size=64", "--set", "data.train_limit=256", "--set", "data.eval_limit=200",
        "--set", "model.encoder.width=8", "--set", "model.projector.hidden_dim=64",
        "--set", "model.predictor.hidden_dim=64", "--set", "model.projection_dim=32",
    ]  # fmt: skip
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "byol_core.cli",
            "reproduce",
            *tiny,
            # Two seeds, one round of trials: the table's mean and spread over seeds.
            "--variants",
            "byol",
            "--seeds",
            "2",
            "--service",
            url,
            "--token",
            TOKEN,
            "--tracking-uri",
            mlflow_server,
            "--out",
            str(out),
        ],
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| BYOL | Batch Norm | Batch Norm | L2 | Implicit | 57.7 |" in proc.stdout
    (row,) = csv.DictReader((out / "results.csv").open())
    assert (row["variant"], row["seeds"]) == ("byol", "2") and float(row["linear_top1_std"]) >= 0
    assert (out / "figures" / "collapse.png").stat().st_size > 10_000

    (job,) = httpx.get(f"{url}/jobs", params={"name": "reproduce-cpu"}, timeout=10).json()["jobs"]
    done = httpx.get(f"{url}/jobs/{job['id']}", timeout=10).json()
    assert done["status"] == "succeeded", done
    sweep = done["sweep"]
    assert sorted(tuple(t["config"]["variant,seed"]) for t in sweep["trials"]) == [
        ("byol", 0), ("byol", 1),
    ]  # fmt: skip
    assert all(t["status"] == "finished" and t["best_metric"] is not None for t in sweep["trials"])
    best = max(sweep["trials"], key=lambda t: t["best_metric"])
    assert sweep["best"]["trial_id"] == best["trial_id"]
    assert sweep["best_config"] == best["config"]

    client = MlflowClient(mlflow_server)
    parent = done["mlflow"]["run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    assert sorted(r.info.run_id for r in children) == sorted(
        t["mlflow_run_id"] for t in sweep["trials"]
    )
    assert "results.md" in {a.path for a in client.list_artifacts(parent)}


def test_cancelling_a_running_job_stops_ray_within_ten_seconds(service, mlflow_server):
    url, start_worker, root = service
    job = submit(url, root, {"name": "cancel-me", "epochs": 50})
    session = start_worker().pid
    wait_for(
        url, job["id"], lambda j: j["status"] == "running" and bool(ray_train_workers(session))
    )
    asked = time.monotonic()
    response = httpx.post(f"{url}/jobs/{job['id']}/cancel", headers=AUTH, timeout=10)
    assert response.status_code in (200, 202), response.text
    done = wait_for(url, job["id"], finished, timeout=10)
    assert done["status"] == "cancelled"
    while ray_train_workers(session) and time.monotonic() - asked < 10:
        time.sleep(0.2)
    assert not ray_train_workers(session), "Ray training workers still alive 10 s after cancel"
    run = MlflowClient(mlflow_server).get_run(done["mlflow"]["run_id"])
    assert run.info.status == "KILLED"


def test_a_killed_worker_loses_its_lease_and_the_job_resumes(service, mlflow_server):
    url, start_worker, root = service
    job = submit(url, root, {"name": "survivor", "epochs": 4, "data": {"train_limit": 512}})
    first = start_worker()
    client = MlflowClient(mlflow_server)

    def epoch_one_logged(j: dict) -> bool:
        run_id = (j.get("mlflow") or {}).get("run_id")
        return bool(run_id) and bool(client.get_metric_history(run_id, "epoch"))

    seen = wait_for(url, job["id"], epoch_one_logged)
    os.killpg(first.pid, signal.SIGKILL)  # the worker, its driver task and its Ray cluster
    first.wait(10)
    start_worker()
    done = wait_for(url, job["id"], finished, timeout=400)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["mlflow"]["run_id"] == seen["mlflow"]["run_id"]
    for key in ("epoch", "train/loss", "eval/linear_top1", "diag/cos_pos"):
        steps = [int(m.step) for m in client.get_metric_history(done["mlflow"]["run_id"], key)]
        assert steps == [1, 2, 3, 4], key


def test_jobs_queued_when_redis_restarts_empty_all_run(service, private_redis):
    url, start_worker, root = service
    queued = [submit(url, root, {"name": f"survive-redis-{i}", "epochs": 1}) for i in range(2)]
    private_redis.stop()  # the stream and its dispatch messages are gone
    private_redis.start()
    start_worker()
    for job in queued:
        done = wait_for(url, job["id"], finished)
        assert done["status"] == "succeeded", done


def test_a_worker_stopped_gracefully_hands_its_job_back(service):
    """SIGTERM (a deploy, `byol serve` stopping): the running job goes back to the queue without
    spending an attempt, and the next worker finishes it."""
    url, start_worker, root = service
    job = submit(url, root, {"name": "handed-back"})
    first = start_worker()
    wait_for(url, job["id"], lambda j: j["status"] == "running")
    first.send_signal(signal.SIGTERM)
    back = wait_for(url, job["id"], lambda j: j["status"] != "running", timeout=30)
    assert back["status"] == "queued" and back["attempts"] == 0, back
    assert first.wait(60) == 0
    start_worker()
    done = wait_for(url, job["id"], finished)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_byol_serve_on_embedded_defaults_runs_a_submitted_job(tmp_path, redis_prefix):
    """What a new user does: `byol serve` in an empty folder (SQLite, local Ray, local MLflow
    store, generated data, a token made for the folder), then `byol submit --wait`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("BYOL_", "MLFLOW_"))}
    env["BYOL_REDIS_PREFIX"] = redis_prefix + "-serve"  # the machine's Redis, our own keys
    (tmp_path / "job.yaml").write_text(
        "name: first\nepochs: 1\nbatch_size: 64\ndata: {train_limit: 256, eval_limit: 200}\n"
        "model: {encoder: {width: 8}}\n"
    )
    serve = subprocess.Popen(
        [sys.executable, "-m", "byol_core.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".byol/api-token").exists() or not _answers(url):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        submit = subprocess.run(
            [sys.executable, "-m", "byol_core.cli", "submit", "job.yaml", "--url", url, "--wait"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert submit.returncode == 0, submit.stderr[-2000:]
        job = json.loads(submit.stdout.strip().splitlines()[-1])
        assert job["status"] == "succeeded" and job["result"]["linear_top1"] is not None
        assert (tmp_path / "byol-service.db").exists()  # the embedded SQLite database
        assert (tmp_path / "mlruns" / "mlflow.db").exists()  # the embedded MLflow store
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
