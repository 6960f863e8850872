"""docker-compose.yml's deployment as plain processes: one job end to end on a Ray cluster.

The commands are the compose file's own (read through tests/test_deployment.py), with local ports
and paths swapped in: `mlflow server` on a PostgreSQL database with the compose file's
--allowed-hosts, a Ray head offering no CPUs and two worker nodes (`ray start`, token
authentication, their own --temp-dir), the API (uvicorn's factory) and `byol worker` with
RAY_ADDRESS pointing at the head. A tiny job is POSTed; the test waits for it to succeed, then
opens the `mlflow.url` of `GET /jobs/{id}` in headless Chromium and reads the run's
`eval/linear_top1` off the rendered page.

Only this test's own Ray processes are stopped at the end (by their session; `ray stop` would
stop every Ray cluster of the machine). Without Chromium (`apt-get install chromium`) the browser
step is skipped, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES, free_port, settings_env
from tests.test_deployment import command
from tests.test_service_e2e import TINY, TOKEN, finished, submit, wait_for

BIN = Path(sys.executable).parent
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def override(cmd: list[str], values: dict[str, str | None]) -> list[str]:
    """A compose command with some --options replaced or added (None: a bare flag)."""
    kept = [arg for arg in cmd if arg.split("=", 1)[0] not in values]
    return kept + [name if value is None else f"{name}={value}" for name, value in values.items()]


def session_processes(sid: int) -> list[int]:
    """The processes of one session: a `ray start` and everything its node started (Ray's
    workers change their process group, not their session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def stop_sessions(leaders: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM to every process of the sessions these processes lead, then SIGKILL to what is
    left (`ray start --block` itself ignores SIGTERM), all sessions at once."""

    def remaining() -> list[int]:
        return [pid for leader in leaders for pid in session_processes(leader.pid)]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in remaining():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _alive(remaining()):
            time.sleep(0.2)
        if not _alive(remaining()):
            break
    for leader in leaders:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(10)


def _alive(pids: list[int]) -> bool:
    """Any of ``pids`` running (zombies, waiting for their parent, do not count)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state != "Z":
            return True
    return False


@dataclass
class Processes:
    """Everything the test starts, by name, stopped however the test ends."""

    folder: Path
    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def wait_until(self, name: str, check: Callable[[], bool], timeout: float) -> None:
        """Until ``check()`` holds; fails at once if the process ``name`` exits first."""
        process, deadline = self.started[name], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{self.log(name)}")
            time.sleep(0.5)
        pytest.fail(f"{name} not ready within {timeout:.0f} s:\n{self.log(name)}")

    def stop(self) -> None:
        stop_sessions(list(self.started.values()))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def mlflow_database() -> Iterator[str]:
    """A PostgreSQL database of its own for MLflow, as in docker-compose.yml."""
    name = f"byol_mlflow_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unavailable: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES).set(drivername="postgresql+psycopg", database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def http_status(url: str, host: str | None = None, timeout: float = 5) -> int | None:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def ray_ports() -> dict[str, str | None]:
    """Free ports for everything a Ray node listens on, so that this cluster never collides
    with another one on the machine."""
    names = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return {name: str(free_port()) for name in names} | {"--disable-usage-stats": None}


def chromium() -> str:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    message = "no Chromium to open the MLflow UI with (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def rendered_text(browser: str, url: str, profile: Path, budget_ms: int) -> str:
    """The page's text after its scripts ran, as headless Chromium renders it."""
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "\n", text))


def test_a_job_on_a_ray_cluster_links_to_its_mlflow_run_which_chromium_renders(
    settings,
    own_pg_url: str,
    api_server,
    processes: Processes,
    mlflow_database: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    token = secrets.token_hex(32)
    # Ray's folders hold Unix sockets, whose paths must stay short: not under pytest's tmp_path.
    ray_temp = Path(tempfile.mkdtemp(prefix="byol-ray-", dir="/tmp"))
    storage = tmp_path / "ray-storage"  # BYOL_RAY_STORAGE: the shared checkpoint storage
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BYOL_", "RAY_"))}
    try:
        # --- MLflow, as compose runs it, on its own PostgreSQL database --------------------
        mlflow_port = free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        mlflow_cmd = override(
            command("mlflow"),
            {
                "--host": "127.0.0.1",
                "--port": str(mlflow_port),
                "--workers": "1",
                "--backend-store-uri": mlflow_database,
                "--artifacts-destination": str(tmp_path / "mlflow-artifacts"),
            },
        )
        processes.start("mlflow", [str(BIN / "mlflow"), *mlflow_cmd[1:]], base_env, tmp_path)

        # --- the Ray cluster: a head for coordination only, two 1-CPU worker nodes ---------
        head_port = free_port()
        address = f"127.0.0.1:{head_port}"
        ray_env = {
            **base_env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_ADDRESS": address,
            "BYOL_RAY_STORAGE": str(storage),
            "RAY_TRAIN_V2_ENABLED": "1",
        }
        head_cmd = override(
            command("ray-head"),
            {
                "--port": str(head_port),
                "--temp-dir": str(ray_temp),
                "--dashboard-port": str(free_port()),
                "--include-dashboard": "false",  # the dashboard's packages are the image's
                **ray_ports(),
            },
        )
        processes.start("ray-head", [str(BIN / "ray"), *head_cmd[1:]], ray_env, tmp_path)

        def cluster_cpus() -> float:
            done = subprocess.run(
                [str(BIN / "ray"), "status", f"--address={address}"],
                env=ray_env, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if done.returncode != 0:
                return -1.0
            cpus = re.search(r"/([\d.]+) CPU", done.stdout)
            return float(cpus[1]) if cpus else 0.0

        processes.wait_until("ray-head", lambda: cluster_cpus() == 0, 60)
        # One node at a time: on a busy 2-core machine two raylets registering at once can
        # miss the GCS's start-up deadline.
        for index in range(2):
            name = f"ray-worker-{index}"
            node_cmd = override(
                command("ray-worker"),
                {"--address": address, "--num-cpus": "1", "--temp-dir": str(ray_temp)}
                | ray_ports(),
            )
            processes.start(name, [str(BIN / "ray"), *node_cmd[1:]], ray_env, tmp_path)
            processes.wait_until(name, lambda n=index: cluster_cpus() == n + 1, 90)

        processes.wait_until("mlflow", lambda: http_status(f"{mlflow_url}/health") == 200, 90)
        # The compose file's allow-list: other containers reach MLflow as mlflow:5000; a
        # foreign Host header is refused.
        api_path = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(api_path, host="mlflow:5000", timeout=60) == 200
        assert http_status(api_path, host="attacker.example:5000", timeout=60) == 403

        # --- the API and a job worker ------------------------------------------------------
        config = settings(
            database_url=own_pg_url,  # not the jobs other modules left queued
            api_tokens={"alice": TOKEN},
            poll_seconds=0.5,
            mlflow_ui_url=mlflow_url,
        )
        api = api_server(config)
        worker_env = {
            **ray_env,
            **settings_env(config),
            "MLFLOW_TRACKING_URI": mlflow_url,
        }
        worker = processes.start(
            "worker",
            [sys.executable, "-m", "byol_core.cli", "worker", "--max-jobs", "1"],
            worker_env,
            tmp_path,
        )
        print(f"services up after {time.monotonic() - started:.0f} s")

        # Two training workers of one CPU each: one on each worker node, batch norm global.
        spec = {"name": "cluster", "distributed": {"workers": 2, "bn_sync": "global"}}
        job = submit(api.url, config.data_root, spec)
        done = wait_for(api.url, job["id"], finished, timeout=400)
        assert done["status"] == "succeeded", (done, processes.log("worker"))
        assert worker.wait(60) == 0, processes.log("worker")
        print(f"job done after {time.monotonic() - started:.0f} s")
        assert done["result"]["linear_top1"] is not None
        assert done["progress"]["epoch"] == TINY["epochs"]

        # Checkpoints in the shared storage, the run folder where the settings put it.
        assert list(storage.rglob("checkpoint.pt")), "Ray Train kept no checkpoint there"
        assert (config.runs_dir / job["id"] / "checkpoint.pt").exists()

        run_id = done["mlflow"]["run_id"]
        run = MlflowClient(mlflow_url).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["distributed.workers"] == "2"
        top1 = run.data.metrics["eval/linear_top1"]
        assert top1 == pytest.approx(done["result"]["linear_top1"])

        # --- the job's MLflow link, in a browser -------------------------------------------
        link = done["mlflow"]["url"]
        assert link == f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        browser = chromium()
        for budget in (20_000, 60_000):  # the UI is a React app: it renders after its requests
            text = rendered_text(browser, link, tmp_path / "chromium", budget)
            shown = re.search(r"eval/linear_top1\s+(-?[\d.]+(?:e-?\d+)?)", text)
            if run_id in text and shown:
                break
        else:
            pytest.fail(f"the run page did not render its metrics:\n{text[-3000:]}")
        assert spec["name"] in text, "the run's name is not on its page"
        assert float(shown[1]) == pytest.approx(top1, rel=1e-9, abs=1e-12)
        print(f"page checked after {time.monotonic() - started:.0f} s")
    finally:
        processes.stop()
        shutil.rmtree(ray_temp, ignore_errors=True)
