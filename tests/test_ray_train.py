"""Data-parallel training on a real local Ray cluster, tracked by a real MLflow server, through
the CLI as a user runs it."""

import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from mlflow.tracking import MlflowClient

from byol_core.checkpoint import load_checkpoint

TINY = [
    "data.train_limit=256",
    "data.eval_limit=200",
    "batch_size=64",
    "model.encoder.width=8",
    "model.projector.hidden_dim=64",
    "model.predictor.hidden_dim=64",
    "model.projection_dim=32",
]
METRICS = [
    "train/loss",
    "train/lr",
    "train/tau",
    "eval/linear_top1",
    "eval/knn_top1",
    "diag/cos_pos",
    "diag/cos_neg",
    "diag/z_std",
]


def byol_train(out, args: list[str]) -> list[str]:
    cli = [sys.executable, "-m", "byol_core.cli", "train", "--workers", "2"]
    return [*cli, "--out", str(out), *args]


def train(out, uri, *extra: str) -> dict:
    args = [a for s in (*TINY, *extra) for a in ("--set", s)]
    proc = subprocess.run(
        byol_train(out, args),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps(client, run_id, key):
    return [int(m.step) for m in client.get_metric_history(run_id, key)]


def test_two_workers_train_track_and_resume(tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server)
    first = train(tmp_path, mlflow_server, "epochs=2")
    assert first["epochs"] == 2 and first["linear_top1"] is not None
    payload = load_checkpoint(first["checkpoint"])
    spec = json.loads(payload["spec"])
    assert spec["distributed"]["workers"] == 2 and spec["distributed"]["bn_sync"] == "global"
    history = json.loads(payload["history"])
    assert [m["epoch"] for m in history] == [1, 2]

    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.2" and run.data.params["distributed.workers"] == "2"
    # The spec says auto; the run records what the workers resolved it to.
    assert run.data.params["runtime.precision"] == "auto"
    assert run.data.tags["byol.precision"] in ("bf16", "fp32")
    for key in METRICS:
        assert steps(client, run.info.run_id, key) == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "figures"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "checkpoints")[-1].path.endswith("epoch_0002")
    models = client.search_logged_models([run.info.experiment_id])
    (encoder,) = [m for m in models if m.name == "encoder" and m.source_run_id == run.info.run_id]
    logged = mlflow.artifacts.download_artifacts(
        artifact_uri=encoder.artifact_location, dst_path=str(tmp_path / "encoder"),
        tracking_uri=mlflow_server,
    )  # fmt: skip
    # Pinned to this environment, not inferred (MLflow's inference listed pytorch-lightning).
    requirements = (Path(logged) / "requirements.txt").read_text().split()
    pinned = {line.split("==")[0]: line for line in requirements}
    assert set(pinned) == {"mlflow", "torch", "torchvision", "cloudpickle", "pydantic", "numpy"}
    # MLflow pins torch without a local label such as +cpu.
    assert pinned["torch"] == f"torch=={version('torch').split('+')[0]}"
    # The logged encoder loads and maps images to features of its width.
    features = mlflow.pytorch.load_model(logged)(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 64)

    # Same run folder, more epochs: Ray Train restores the latest checkpoint and only epoch 3
    # runs, in the same MLflow run. Epochs 1-2 are the first run's records, timings included.
    second = train(tmp_path, mlflow_server, "epochs=3")
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["epochs"] == 3
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == history
    for key in METRICS:
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key


def ray_train_workers() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::RayTrainWorker" in line]


def test_sigkill_of_a_training_worker_mid_epoch(tmp_path, mlflow_server):
    """Ray Train restarts the worker group from the latest checkpoint; the job finishes with every
    epoch once in its history and in every MLflow metric history."""
    client = MlflowClient(mlflow_server)
    args = [a for s in (*TINY, "epochs=4", "data.train_limit=512") for a in ("--set", s)]
    proc = subprocess.Popen(
        byol_train(tmp_path, args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`byol.run_key` = '{tmp_path}'",
        )
        if runs and steps(client, runs[0].info.run_id, "epoch") == [1]:
            workers = ray_train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed, 9)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None, "never saw epoch 1 with a live training worker"
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 4
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    for key in METRICS:
        assert steps(client, summary["mlflow_run_id"], key) == [1, 2, 3, 4], key


def test_an_error_inside_a_training_worker_reaches_the_cli_as_one_line(tmp_path, mlflow_server):
    """A missing dataset gets its own one-line message, not Ray's traceback; on one machine the
    driver's data pre-flight finds it before any Ray worker or MLflow run is started."""
    missing = tmp_path / "nowhere"
    args = ["--set", "data.name=imagefolder", "--set", f"data.path={missing}"]
    proc = subprocess.run(
        byol_train(tmp_path / "run", args),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("byol: error: imagefolder path") and str(missing) in last
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`byol.run_key` = '{tmp_path / 'run'}'",
    )
    assert runs == []
