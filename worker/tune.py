"""A SweepSpec on Ray Tune: every trial is a distributed training run on Ray Train (the
Train-inside-Tune pattern of Ray Train V2), tracked in MLflow like a single job.

Each Tune trial runs ``run_trial``, a driver that asks Ray for no CPU: it resolves the trial's
JobSpec and runs ``worker.ray_train.run_job`` on it, whose TorchTrainer reports every epoch to
Tune through ``TuneReportCallback`` so that ASHA can stop the trial between epochs. MLflow holds
one parent run for the sweep and one child run per trial (tag ``mlflow.parentRunId``) with the
same per-epoch metrics, checkpoints, figures and encoder as a job's run.

Resources: a trial's driver reserves 0 CPU (and a little memory, since Tune needs a non-empty
reservation); its Train workers reserve ``distributed.workers × distributed.cpus_per_worker``
CPUs (and a GPU each with ``use_gpu``). Tune does not see the workers' share, so the number of
trials at once is capped at what the cluster holds: on 2 cores, 2 trials of 1 worker × 1 CPU.

Resume: Tune keeps the experiment's state (trial statuses, the sampler) under the storage path;
``run_sweep`` with the same ``out_dir``/``run_key`` restores it, so finished trials are not run
again and unfinished ones continue from their Ray Train checkpoints, in the same MLflow runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Tune saves its experiment state at most this often (its default adapts up to minutes); a
# trial that ended after the last save would run again when the sweep resumes.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

import ray
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.exceptions import RayTaskError
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from byol_core.errors import ByolError
from byol_core.study_report import TrialResult, write_study_report
from byol_core.sweep import (
    Choice,
    Domain,
    Grid,
    LogUniform,
    SweepSpec,
    max_epochs,
    probe_specs,
    trial_spec,
)
from worker.ray_cluster import init_ray
from worker.ray_train import ray_name
from worker.tracking import find_run, flatten, open_run, tracking_uri

log = logging.getLogger("byol.sweep")

# What a trial's driver reserves instead of a CPU (Tune refuses an empty reservation).
TRIAL_MEMORY = 256 * 1024**2
TRIAL_TAG = "byol.trial_id"
SWEEP_TAG = "byol.sweep"
STOPPED_TAG = "byol.stopped_early"


class SweepError(ByolError):
    """A sweep that could not run, or ended without a result."""


def run_sweep(
    sweep: SweepSpec,
    out_dir: str | Path,
    run_key: str | None = None,
    uri: str | None = None,
    progress: bool = False,
    storage: str | None = None,
) -> dict[str, Any]:
    """Run ``sweep`` to the end (or resume it: same ``out_dir`` and ``run_key``) and return its
    summary: the best trial and its MLflow run, every trial's config, status and best metric,
    and the best config. ``uri``: MLflow tracking URI (default ``MLFLOW_TRACKING_URI`` or the
    embedded store). ``progress``: one line per trial event on stderr."""
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = run_key or str(out_dir)
    uri = uri or tracking_uri()
    same_sweep(out_dir, sweep)
    init_ray()
    concurrency = concurrent_trials(sweep)
    parent = open_run(run_key, uri, sweep.name, {"byol.kind": "sweep"}, sweep_params(sweep))
    MlflowClient(uri).log_artifact(parent, str(out_dir / "sweep.json"))
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            sweep_json=sweep.model_dump_json(),
            run_key=run_key,
            parent_run_id=parent,
            uri=uri,
            out_dir=str(out_dir),
        ),
        {"cpu": 0, "memory": TRIAL_MEMORY},
    )
    storage = str(storage or os.environ.get("BYOL_RAY_STORAGE") or out_dir / "ray")
    name = ray_name(run_key)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        # Finished and failed trials stay as they ended; unfinished ones run again.
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: domain_of(d) for key, d in sweep.space.items()},
            tune_config=tune.TuneConfig(
                search_alg=BasicVariantGenerator(
                    max_concurrent=concurrency, random_state=sweep.seed
                ),
                scheduler=scheduler(sweep),
                num_samples=sweep.num_samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                # Ray Train already restarts a trial's failed workers (3 times).
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[TrialTracking(uri, parent, sweep, progress)],
            ),
        )
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        finish(uri, parent, "KILLED")
        raise
    except Exception:
        finish(uri, parent, "FAILED")
        raise
    summary = summarize(sweep, grid.experiment_path, uri, parent)
    summary |= {"max_concurrent_trials": concurrency, "seconds": time.perf_counter() - started}
    if sweep.report == "study":
        report(sweep, grid.experiment_path, uri, parent, out_dir)
    return record(summary, uri, parent, out_dir)


# --- the trial ----------------------------------------------------------------------------------


def run_trial(
    config: dict[str, Any],
    sweep_json: str,
    run_key: str,
    parent_run_id: str,
    uri: str,
    out_dir: str,
) -> None:
    """One Tune trial (in a Tune actor that reserves no CPU): the trial's spec as a job on Ray
    Train, whose epochs reach Tune through TuneReportCallback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from worker.ray_train import run_job
    from worker.reclaim import watch

    # Tune removes a trial's group when the trial ends, but not once its own driver is killed
    # (a cancelled sweep): the janitor then removes it with this actor.
    group = ray.util.get_current_placement_group()
    if group is not None:
        watch(group)
    sweep = SweepSpec.model_validate_json(sweep_json)
    trial_id = tune.get_context().get_trial_id()
    done = find_run(f"{run_key}/{trial_id}", uri)
    if done is not None and done.info.status == "FINISHED":
        # It ended after Tune last saved the sweep's state, then the sweep's driver died:
        # resuming must not run it (and log its model) again.
        return
    spec = trial_spec(sweep, config, name=f"{sweep.name}-{trial_id}")
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, SWEEP_TAG: run_key, TRIAL_TAG: trial_id}
    run_job(
        spec,
        Path(out_dir) / "trials" / trial_id,
        run_key=f"{run_key}/{trial_id}",
        uri=uri,
        tags=tags,
        callbacks=[TuneReportCallback()],
    )


def trial_dirname(trial: Trial) -> str:
    return trial.trial_id


def domain_of(domain: Domain) -> Any:
    if isinstance(domain, LogUniform):
        return tune.loguniform(domain.low, domain.high)
    if isinstance(domain, Choice):
        return tune.choice(domain.values)
    if isinstance(domain, Grid):
        return tune.grid_search(domain.values)
    return tune.uniform(domain.low, domain.high)


def scheduler(sweep: SweepSpec) -> ASHAScheduler | None:
    asha = sweep.scheduler
    if asha is None:
        return None
    return ASHAScheduler(
        time_attr="epoch",
        metric=asha.metric,
        mode=asha.mode,
        # ASHA's rungs go up to max_t. None may sit on the last epoch: a trial there has done
        # its training, and a stop would only kill it before its final checkpoint, figures and
        # encoder reach MLflow. So the last rung is at most the one-but-last epoch, and a
        # trial that passes it ends by itself.
        max_t=max_epochs(sweep) - 1,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
        stop_last_trials=False,
    )


def concurrent_trials(sweep: SweepSpec) -> int:
    """``max_concurrent_trials``, lowered to what the cluster holds: Tune reserves nothing for
    the Train workers a trial starts, and trials that cannot all get their workers would
    wait on each other."""
    cpus = max(s.distributed.workers * s.distributed.cpus_per_worker for s in probe_specs(sweep))
    gpus = max(s.distributed.workers * s.distributed.use_gpu for s in probe_specs(sweep))
    have = ray.cluster_resources()
    have_cpus, have_gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus > have_cpus or gpus > have_gpus:
        raise SweepError(
            f"a trial needs {cpus} CPU and {gpus} GPU (distributed.workers × "
            f"cpus_per_worker, one GPU per worker with use_gpu) but the Ray cluster has "
            f"{have_cpus:g} CPU and {have_gpus:g} GPU"
        )
    fits = min(have_cpus // cpus, have_gpus // gpus if gpus else math.inf)
    if fits < sweep.max_concurrent_trials:
        log.warning(
            "running %d trials at once, not %d: each needs %d CPU / %d GPU of the cluster's "
            "%g / %g",
            fits,
            sweep.max_concurrent_trials,
            cpus,
            gpus,
            have_cpus,
            have_gpus,
        )
    return int(min(sweep.max_concurrent_trials, fits))


# --- tracking -----------------------------------------------------------------------------------


def same_sweep(out_dir: Path, sweep: SweepSpec) -> None:
    """Keep the sweep in its folder; refuse to resume a folder with another sweep in it."""
    path = out_dir / "sweep.json"
    text = sweep.model_dump_json(indent=2)
    if path.exists() and SweepSpec.model_validate_json(path.read_text()) != sweep:
        raise SweepError(
            f"{out_dir} holds another sweep (its spec is in sweep.json): choose another folder"
        )
    path.write_text(text)


def sweep_params(sweep: SweepSpec) -> dict[str, str]:
    # MLflow refuses commas in names: fields searched together show as variant/seed.
    space = {
        f"space.{key.replace(',', '/')}": str(
            domain.model_dump(exclude={"type"}) | {"type": domain.type}
        )
        for key, domain in sweep.space.items()
    }
    settings = sweep.model_dump(mode="json", exclude={"base", "space"})
    return {
        **space,
        **flatten(settings, "sweep."),
        **flatten(sweep.base.model_dump(mode="json"), "base."),
    }


class TrialTracking(tune.Callback):
    """In the sweep's driver: closes the MLflow run of a trial that ASHA stopped (its Train run
    was killed mid-way, so nothing else will), and prints progress."""

    def __init__(self, uri: str, parent_run_id: str, sweep: SweepSpec, progress: bool) -> None:
        self.uri, self.parent, self.progress = uri, parent_run_id, progress
        self.metric = sweep.metric
        self.sweep_json = sweep.model_dump_json()

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict, **info):
        if self.progress and "epoch" in result:
            shown = f" {self.metric}={result[self.metric]:.4g}" if self.metric in result else ""
            self.say(f"trial {trial.trial_id}: epoch {int(result['epoch'])}{shown}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info):
        sweep = SweepSpec.model_validate_json(self.sweep_json)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        if complete(trial_spec(sweep, trial.config), epoch):
            self.say(f"trial {trial.trial_id}: finished")
            return
        self.say(f"trial {trial.trial_id}: stopped early after epoch {epoch}")
        run_id = child_runs(self.uri, self.parent).get(trial.trial_id)
        if run_id is not None:
            client = MlflowClient(self.uri)
            client.set_tag(run_id, STOPPED_TAG, "true")
            client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info):
        self.say(f"trial {trial.trial_id}: failed")
        run_id = child_runs(self.uri, self.parent).get(trial.trial_id)
        if run_id is not None and MlflowClient(self.uri).get_run(run_id).info.status == "RUNNING":
            MlflowClient(self.uri).set_terminated(run_id, "FAILED")

    def say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)


def child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> MLflow run id of the sweep's trials."""
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    )
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def finish(uri: str, parent_run_id: str, status: str) -> None:
    """End the sweep's run and its trials' runs that are still running with ``status``
    (KILLED for a cancelled sweep): call it after cancelling the sweep's driver."""
    client = MlflowClient(uri)
    for run_id in [*child_runs(uri, parent_run_id).values(), parent_run_id]:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.from_string(status)))


# --- the summary --------------------------------------------------------------------------------


def complete(spec: Any, epoch: int) -> bool:
    # An evaluation-only spec (pretrain false) reports epoch 0 and is done.
    return epoch >= (spec.epochs if spec.pretrain else 0)


def summarize(sweep: SweepSpec, experiment_path: str, uri: str, parent: str) -> dict[str, Any]:
    analysis = tune.ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    runs = child_runs(uri, parent)
    trials = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = frames.get(trial.trial_id)
        values, epochs = [], 0
        if frame is not None and not frame.empty:
            if sweep.metric in frame:
                values = [float(v) for v in frame[sweep.metric].dropna()]
            epochs = int(frame["epoch"].max()) if "epoch" in frame else 0
        best = (max if sweep.mode == "max" else min)(values) if values else None
        trials.append(
            {
                "trial_id": trial.trial_id,
                "config": dict(trial.config),
                "status": status(sweep, trial, epochs),
                "best_metric": best,
                "epochs": epochs,
                "mlflow_run_id": runs.get(trial.trial_id),
                "error": error_of(trial),
            }
        )
    ranked = [t for t in trials if t["best_metric"] is not None]
    sign = 1 if sweep.mode == "max" else -1
    best = max(ranked, key=lambda t: sign * t["best_metric"], default=None)
    return {
        "kind": "sweep",
        "name": sweep.name,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "best": best,
        "best_config": best["config"] if best else None,
        "trials": trials,
        "mlflow_run_id": parent,
    }


def trial_results(sweep: SweepSpec, experiment_path: str) -> list[TrialResult]:
    """Every trial that reported, with its per-epoch metrics as Tune received them (an epoch
    reported again after a restart counts once, as its last report)."""
    analysis = tune.ExperimentAnalysis(experiment_path)
    frames = analysis.trial_dataframes
    out = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = frames.get(trial.trial_id)
        if frame is None or frame.empty or "epoch" not in frame:
            continue
        by_epoch: dict[int, dict[str, float]] = {}
        for row in frame.to_dict("records"):
            metrics = {
                k: float(v)
                for k, v in row.items()
                if "/" in k and isinstance(v, int | float) and math.isfinite(v)
            }
            by_epoch[int(row["epoch"])] = metrics | {"epoch": int(row["epoch"])}
        spec = trial_spec(sweep, trial.config)
        seconds = float(frame["time_total_s"].iloc[-1]) if "time_total_s" in frame else 0.0
        history = [by_epoch[e] for e in sorted(by_epoch)]
        status_ = status(sweep, trial, max(by_epoch))
        out.append(TrialResult(spec.variant or "", spec.seed, spec, history, seconds, status_))
    return out


def report(sweep: SweepSpec, experiment_path: str, uri: str, parent: str, out_dir: Path) -> None:
    """The study's table and figures, in the sweep's folder and its parent run."""
    trials = trial_results(sweep, experiment_path)
    if not trials:
        return
    client = MlflowClient(uri)
    for path in write_study_report(trials, out_dir, title=sweep.name):
        folder = path.parent.relative_to(out_dir).as_posix()
        client.log_artifact(parent, str(path), None if folder == "." else folder)


def status(sweep: SweepSpec, trial: Trial, epochs: int) -> str:
    """finished, stopped (early, by the scheduler), failed, or not ended (pending, running,
    paused: a sweep that was interrupted)."""
    if trial.status == Trial.ERROR:
        return "failed"
    if trial.status == Trial.TERMINATED:
        return "finished" if complete(trial_spec(sweep, trial.config), epochs) else "stopped"
    return trial.status.lower()


def error_of(trial: Trial) -> str | None:
    if trial.status != Trial.ERROR:
        return None
    error = trial.get_pickled_error() or trial.get_error()
    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    lines = str(error).strip().splitlines()
    return lines[-1][:2000] if lines else type(error).__name__


def record(summary: dict[str, Any], uri: str, parent: str, out_dir: Path) -> dict[str, Any]:
    """Write the summary to the run folder and the parent run; end the parent run."""
    client = MlflowClient(uri)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    client.log_artifact(parent, str(path))
    unfinished = [t["trial_id"] for t in summary["trials"] if t["status"] not in TERMINAL]
    if unfinished:
        finish(uri, parent, "KILLED")
        raise SweepError(
            f"the sweep stopped before trials {unfinished} ended; run it again with the same "
            "out folder to resume"
        )
    best = summary["best"]
    if best is None:
        finish(uri, parent, "FAILED")
        errors = [t["error"] for t in summary["trials"] if t["error"]]
        raise SweepError(
            f"no trial reported {summary['metric']}" + (f": {errors[0]}" if errors else "")
        )
    now = int(time.time() * 1000)
    client.log_batch(
        parent, metrics=[Metric(f"best/{summary['metric']}", best["best_metric"], now, 0)]
    )
    client.set_tag(parent, "byol.best_trial", best["trial_id"])
    if best["mlflow_run_id"]:
        client.set_tag(parent, "byol.best_run_id", best["mlflow_run_id"])
    client.set_terminated(parent, "FINISHED")
    return summary


TERMINAL = ("finished", "stopped", "failed")
