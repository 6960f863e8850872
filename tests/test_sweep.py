"""Sweeps on a real local Ray cluster (Ray Train trials inside Ray Tune), tracked by a real MLflow
server: ASHA stops weak trials early, MLflow nests one child run per trial under the sweep's run,
and a sweep whose driver is cancelled gives its CPUs back (also when a Train controller dies while
its workers start) and resumes without re-running the trials that had finished."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from byol_core.presets import resolve_spec
from byol_core.sweep import SweepSpec
from worker.ray_cluster import PREEMPTION_WATCHER, init_ray

TINY = {
    "data": {"train_limit": 256, "eval_limit": 200},
    "batch_size": 64,
    "model": {
        "encoder": {"width": 8},
        "projector": {"hidden_dim": 64},
        "predictor": {"hidden_dim": 64},
        "projection_dim": 32,
    },
}


def children(client: MlflowClient, parent: str) -> dict[str, object]:
    """trial id -> MLflow run of the sweep's trials."""
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    return {r.data.tags["byol.trial_id"]: r for r in runs}


def epochs_logged(client: MlflowClient, run_id: str) -> list[tuple[int, int]]:
    """(epoch, when it was logged) of every epoch in the run."""
    return sorted((int(m.step), m.timestamp) for m in client.get_metric_history(run_id, "epoch"))


def test_asha_stops_weak_trials_and_mlflow_nests_every_trial(tmp_path, mlflow_server):
    """The LARS learning rate and the EMA tau: 4 trials, 2 at a time, ASHA on linear top-1."""
    doc = {
        "kind": "sweep",
        "name": "lars-tiny",
        "base": {**TINY, "epochs": 3, "optim": {"name": "lars"}},
        "space": {
            "optim.lr": {"type": "loguniform", "low": 0.01, "high": 2.0},
            "ema.tau": {"type": "uniform", "low": 0.9, "high": 0.999},
        },
        "num_samples": 4,
        "max_concurrent_trials": 2,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "byol_core.cli", "sweep", str(path), "--out", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == 4
    stopped = [t for t in trials.values() if t["status"] == "stopped"]
    finished = [t for t in trials.values() if t["status"] == "finished"]
    assert stopped, "ASHA stopped no trial"
    assert len(stopped) + len(finished) == 4
    assert all(t["epochs"] < 3 for t in stopped) and all(t["epochs"] == 3 for t in finished)
    best = max(trials.values(), key=lambda t: t["best_metric"])
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert summary["best_config"] == best["config"] and set(best["config"]) == set(doc["space"])
    assert f"trial {stopped[0]['trial_id']}: stopped early" in proc.stderr

    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["byol.kind"] == "sweep"
    assert parent.data.metrics["best/eval/linear_top1"] == best["best_metric"]
    assert parent.data.tags["byol.best_run_id"] == best["mlflow_run_id"]
    assert parent.data.params["space.optim.lr"].startswith("{'low': 0.01, 'high': 2.0")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.json"}

    runs = children(client, parent.info.run_id)
    assert set(runs) == set(trials)
    for trial_id, run in runs.items():
        trial = trials[trial_id]
        assert run.info.run_id == trial["mlflow_run_id"] and run.info.status == "FINISHED"
        assert float(run.data.params["optim.lr"]) == trial["config"]["optim.lr"]
        assert float(run.data.params["ema.tau"]) == trial["config"]["ema.tau"]
        top1 = [int(m.step) for m in client.get_metric_history(run.info.run_id, "eval/linear_top1")]
        # A stopped trial's run may have logged the epoch it was in when the stop reached it.
        assert top1[: trial["epochs"]] == list(range(1, trial["epochs"] + 1)), trial_id
        assert len(top1) == len(set(top1))
        early = run.data.tags.get("byol.stopped_early") == "true"
        assert early == (trial["status"] == "stopped"), trial_id
    for trial in finished:
        run_id = trial["mlflow_run_id"]
        assert {"checkpoints", "figures"} <= {a.path for a in client.list_artifacts(run_id)}
    models = client.search_logged_models([parent.info.experiment_id])
    assert {m.source_run_id for m in models} >= {t["mlflow_run_id"] for t in finished}


@pytest.fixture
def local_ray():
    """A Ray cluster of this test process, standing for a ``byol worker``'s: it outlives the
    sweep's driver task."""
    watcher = os.environ.get(PREEMPTION_WATCHER)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if watcher is None:
        os.environ.pop(PREEMPTION_WATCHER, None)


def actor_classes() -> Counter[str]:
    """How many actors of each class the cluster has started, dead ones included."""
    return Counter(actor["ActorClassName"] for actor in ray._private.state.actors().values())


def eventually(holds: Callable[[], bool], timeout: float) -> bool:
    """Whether ``holds()`` comes true within ``timeout`` seconds, looking every half second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds():
            return True
        time.sleep(0.5)
    return False


def cpus_free(timeout: float) -> bool:
    return eventually(
        lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], timeout
    )


def groups_left(cpu_only: bool = False) -> list[str]:
    """Placement groups not removed (``cpu_only``: those that reserve CPUs, which Train's do and
    Tune's trial groups, 256 MB of memory each, do not)."""
    return [
        f"{pg_id} {group['state']} {group['bundles']}"
        for pg_id, group in ray.util.placement_group_table().items()
        if group["state"] != "REMOVED"
        and (not cpu_only or any("CPU" in b for b in group["bundles"].values()))
    ]


def test_a_train_controller_killed_while_its_workers_start_leaves_no_placement_group(
    tmp_path, mlflow_server, local_ray
):
    """The window a cancelled sweep once leaked a group through (a CI run): Ray Train has made
    its workers' placement group and is starting them when its controller is killed. Here the
    start is held there until the job's driver task, which owns the controller, is killed."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    from worker.ray_train import run_job

    marker = tmp_path / "starting"

    class HoldTheStart(WorkerGroupCallback):
        def before_init_train_context(self, workers):
            marker.touch()
            time.sleep(300)
            return {}

    def drive() -> None:
        run_job(resolve_spec(TINY), tmp_path / "run", uri=mlflow_server, callbacks=[HoldTheStart()])

    task = ray.remote(num_cpus=0, max_retries=0)(drive).remote()
    deadline = time.monotonic() + 180
    while not marker.exists():
        ready, _ = ray.wait([task], timeout=0.5)
        assert not ready, f"the job ended before its workers started: {ray.get(task)}"
        assert time.monotonic() < deadline, "the workers never started"
    assert groups_left(cpu_only=True), "no placement group while the workers start"

    ray.cancel(task, force=True, recursive=True)
    gone = eventually(lambda: not groups_left(cpu_only=True), 60)
    assert gone, f"left behind: {groups_left(cpu_only=True)}"
    assert cpus_free(30), f"CPUs still held: {ray.available_resources()}"


def test_a_cancelled_sweep_frees_its_cpus_and_resumes_without_rerunning_trials(
    tmp_path, mlflow_server, local_ray
):
    """The driver runs as a Ray task, as the job worker runs it; cancelling that task by force
    stops every trial. Running the sweep again with the same folder and key resumes it: the
    finished trials are not run again and the interrupted one goes on from its checkpoint."""
    from worker.tune import finish, run_sweep

    base = resolve_spec({**TINY, "epochs": 2})
    # One trial at a time: the second starts once Tune has the first as ended.
    sweep = SweepSpec(
        name="seeds",
        base=base,
        space={"seed": {"type": "grid", "values": [0, 1]}},
        max_concurrent_trials=1,
    )
    drive = ray.remote(num_cpus=0, max_retries=0)(run_sweep)
    out, key = str(tmp_path / "s"), "sweep-job-1"
    client = MlflowClient(mlflow_server)

    task = drive.remote(sweep, out, key, mlflow_server)
    deadline, before, ended = time.monotonic() + 400, {}, {}
    while time.monotonic() < deadline:
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`byol.run_key` = '{key}'",
        )
        if found:
            runs = children(client, found[0].info.run_id)
            done = {t for t, r in runs.items() if r.info.status == "FINISHED"}
            running = {t for t, r in runs.items() if r.info.status == "RUNNING"}
            if done and any(epochs_logged(client, runs[t].info.run_id) for t in running):
                before = {t: epochs_logged(client, r.info.run_id) for t, r in runs.items()}
                ended = {t: runs[t].info.end_time for t in done}
                break
        ready, _ = ray.wait([task], timeout=0.5)
        assert not ready, f"the sweep ended before it could be cancelled: {ray.get(task)}"
    assert before, "never saw a finished trial next to a running one"
    parent = found[0].info.run_id

    ray.cancel(task, force=True, recursive=True)
    assert cpus_free(60), f"CPUs still held after the cancel: {ray.available_resources()}"
    gone = eventually(lambda: not groups_left(), 30)
    assert gone, f"placement groups left after the cancel: {groups_left()}"
    finish(mlflow_server, parent, "KILLED")
    assert client.get_run(parent).info.status == "KILLED"

    summary = ray.get(drive.remote(sweep, out, key, mlflow_server), timeout=600)
    assert summary["mlflow_run_id"] == parent
    assert [t["status"] for t in summary["trials"]] == ["finished"] * 2
    assert [t["config"]["seed"] for t in summary["trials"]] == [0, 1]
    after = children(client, parent)
    seen = tune.ExperimentAnalysis(str(tmp_path / "s" / "ray" / key)).trial_dataframes
    assert set(after) == {t["trial_id"] for t in summary["trials"]}
    for trial_id, logged in before.items():
        now = epochs_logged(client, after[trial_id].info.run_id)
        assert [e for e, _ in now] == [1, 2], trial_id
        assert now[: len(logged)] == logged, trial_id
        # What Tune kept of the trial: no epoch twice, so none was trained again, ending at the
        # last. (Tune's loggers buffer their files: a driver killed by force can lose the rows
        # of the epochs before the cancel, as a CI run once did with epoch 1.)
        tune_epochs = list(seen[trial_id]["epoch"])
        assert len(tune_epochs) == len(set(tune_epochs)), (trial_id, tune_epochs)
        assert tune_epochs[-1] == 2 and set(tune_epochs) <= {1, 2}, (trial_id, tune_epochs)
    for trial_id, end_time in ended.items():  # the finished trials did not run again
        assert after[trial_id].info.end_time == end_time, trial_id
    assert client.get_run(parent).info.status == "FINISHED"
    # Ray frees a finished sweep's trial actors asynchronously: as long as after the cancel.
    assert cpus_free(60), f"CPUs still held after the sweep: {ray.available_resources()}"
    assert not groups_left(), f"placement groups left after the sweep: {groups_left()}"
    # Every run's groups went back through the janitor alone. Not started: Ray's cleaner (which
    # needs the dashboard), the preemption watcher (for nodes an autoscaler drains) and the
    # dataset manager (for Ray Data, which these runs do not read).
    classes = actor_classes()
    assert classes.get("Janitor") == 1 and classes.get("TrainController", 0) >= 2, classes
    unused = {"PlacementGroupCleaner", "PreemptionWatcher", "DatasetManager"}
    assert not unused & set(classes), classes
