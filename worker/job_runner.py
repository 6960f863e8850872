"""``byol worker``: take jobs from the service's queue and run them on Ray Train.

One job at a time per worker process. The job's driver (``run_job``: MLflow run, Ray Train
run, final model) runs as a Ray task, so this process stays free to renew the job's lease,
notice cancellation and publish progress. Killing the task with ``ray.cancel(force=True)``
takes the Ray Train controller and its training workers with it (Ray ties an actor's life to
its owner's), which is how cancellation stops a run within seconds.

A worker that dies simply stops renewing its lease; another worker claims the job when the
lease expires and runs it again with the same run key, so Ray Train resumes from the latest
checkpoint and MLflow continues the same run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from pydantic import TypeAdapter

from byol_core.errors import ByolError
from byol_core.spec import JobSpec
from byol_core.sweep import AnySpec, SweepSpec
from service import jobs
from service.db import Job, Status, make_engine, make_sessions, migrate
from service.queue import Queue
from service.settings import Settings, load_settings
from worker.ray_cluster import init_ray
from worker.tracking import open_run, start_or_resume_run, tracking_uri

log = logging.getLogger("byol.worker")
SPEC: TypeAdapter[JobSpec | SweepSpec] = TypeAdapter(AnySpec)

PROGRESS_KEYS = (
    "train/loss",
    "eval/linear_top1",
    "eval/knn_top1",
    "diag/cos_pos",
    "diag/cos_neg",
    "diag/z_std",
)


@ray.remote(num_cpus=0, max_retries=0)
def drive(
    spec_json: str, out_dir: str, run_key: str, uri: str, storage: str | None, local: bool
) -> dict[str, Any]:
    """The job's driver, inside Ray: it asks for no CPU so that the training workers it
    starts get every core of a small machine. A sweep's driver is Ray Tune's. Everything it
    needs comes as arguments: a task sees its node's environment, not this worker's."""
    spec = SPEC.validate_json(spec_json)
    if isinstance(spec, SweepSpec):
        from worker.tune import run_sweep

        return run_sweep(spec, out_dir, run_key=run_key, uri=uri, storage=storage)
    from worker.ray_train import run_job

    return run_job(spec, out_dir, run_key=run_key, uri=uri, storage=storage, local=local)


class JobRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        migrate(settings.database_url)
        self.sessions = make_sessions(make_engine(settings.database_url))
        self.queue = Queue(settings.redis_url, settings.redis_prefix)
        self.uri = tracking_uri()
        self.stopping = threading.Event()

    # --- the loop ------------------------------------------------------------------------------

    def connect(self) -> None:
        init_ray()

    def serve(self, max_jobs: int | None = None) -> None:
        self.connect()
        log.info("worker %s ready (database %s)", self.name, self.settings.database_url)
        done = 0
        while not self.stopping.is_set() and (max_jobs is None or done < max_jobs):
            job = self.next_job()
            if job is not None:
                self.run(job)
                done += 1

    def next_job(self) -> Job | None:
        """A job announced on the stream, else any claimable job in SQL: one that Redis never
        carried (it was down, or restarted empty) or one whose worker died."""
        started = time.monotonic()
        announced = self.queue.receive(self.name, block_ms=int(self.settings.poll_seconds * 1000))
        with self.sessions() as session:
            for job_id in announced:
                job = jobs.claim(session, self.name, self.settings.lease_seconds, job_id)
                if job is not None:
                    return job
            job = jobs.claim(session, self.name, self.settings.lease_seconds)
        if job is None and not announced:
            # Redis down returns at once: do not spin.
            self.stopping.wait(max(0.0, self.settings.poll_seconds - (time.monotonic() - started)))
        return job

    # --- one job -------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        log.info("job %s: attempt %d of %d", job.id, job.attempts, job.max_attempts)
        try:
            spec = absolute_paths(SPEC.validate_python(job.spec))
            run_id = self.mlflow_run(spec, job.id)
        except Exception as exc:  # an unusable spec or tracking store: fail the job, not us
            self.settle(job.id, Status.failed, error=f"could not start: {exc}")
            return
        experiment_id = MlflowClient(self.uri).get_run(run_id).info.experiment_id
        # The experiment id rides along so the API can link the MLflow UI while the job runs.
        progress = {
            "epoch": 0,
            "epochs": spec.base.epochs if isinstance(spec, SweepSpec) else spec.epochs,
            "metrics": {},
            "experiment_id": experiment_id,
        }
        with self.sessions() as session:
            jobs.record(
                session,
                job.id,
                self.name,
                mlflow_run_id=run_id,
                progress=progress,
            )
        self.queue.publish(job.id, {"status": Status.running, "progress": progress})
        out_dir = Path(self.settings.runs_dir).resolve() / job.id
        task = drive.remote(
            spec.model_dump_json(),
            str(out_dir),
            job.id,
            self.uri,
            os.environ.get("BYOL_RAY_STORAGE"),
            not os.environ.get("RAY_ADDRESS"),
        )
        watcher = (
            SweepWatcher(self.uri, run_id, progress, spec)
            if isinstance(spec, SweepSpec)
            else ProgressWatcher(self.uri, run_id, progress)
        )
        beat_every = self.settings.lease_seconds / 3
        last_beat = time.monotonic()
        while True:
            ready, _ = ray.wait([task], timeout=1.0)
            if ready:
                break
            now = time.monotonic()
            if now - last_beat >= min(beat_every, 1.0):
                with self.sessions() as session:
                    beat = jobs.heartbeat(session, job.id, self.name, self.settings.lease_seconds)
                last_beat = now
                if not beat.owned:
                    log.warning("job %s: lease lost to another worker; stopping", job.id)
                    ray.cancel(task, force=True, recursive=True)
                    return
                if beat.cancel or self.stopping.is_set():
                    self.stop(job, task, run_id, cancelled=beat.cancel)
                    return
            update = watcher.poll()
            if update is not None:
                with self.sessions() as session:
                    jobs.record(session, job.id, self.name, progress=update)
                self.queue.publish(job.id, {"status": Status.running, "progress": update})
        try:
            summary = ray.get(task)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            message = (
                str(cause) if isinstance(cause, ByolError) else f"{type(cause).__name__}: {cause}"
            )
            self.settle(job.id, Status.failed, error=message.strip().splitlines()[-1][:2000])
            return
        except ray.exceptions.RayError as exc:  # the driver's process died (OOM, node lost)
            self.settle(job.id, Status.failed, error=f"{type(exc).__name__}: {exc}"[:2000])
            return
        summary["experiment_id"] = experiment_id
        final = watcher.poll(force=True) or progress
        with self.sessions() as session:
            jobs.record(session, job.id, self.name, progress=final)
        self.settle(job.id, Status.succeeded, result=summary)

    def stop(self, job: Job, task: ray.ObjectRef, run_id: str, cancelled: bool) -> None:
        ray.cancel(task, force=True, recursive=True)
        if cancelled:
            from worker.tune import finish

            # The run, and a sweep's trial runs, that the killed driver left running.
            finish(self.uri, run_id, RunStatus.to_string(RunStatus.KILLED))
            self.settle(job.id, Status.cancelled)
            return
        # Shutting down: hand the job back, its next run resumes from the checkpoint.
        with self.sessions() as session:
            jobs.release(session, job.id, self.name)
        self.queue.dispatch(job.id)
        log.info("job %s: released for another worker", job.id)

    def mlflow_run(self, spec: JobSpec | SweepSpec, run_key: str) -> str:
        """The job's MLflow run, created here so the API can link it from the start; the
        driver finds the same run by its key."""
        if isinstance(spec, SweepSpec):
            from worker.tune import sweep_params

            params = sweep_params(spec)
            return open_run(run_key, self.uri, spec.name, {"byol.kind": "sweep"}, params)
        return start_or_resume_run(spec, run_key, self.uri)

    def settle(self, job_id: str, status: Status, **fields: Any) -> None:
        with self.sessions() as session:
            jobs.finish(session, job_id, self.name, status, **fields)
            progress = jobs.get_job(session, job_id).progress
        event = {"status": status, "progress": progress, **fields}
        self.queue.publish(job_id, event)
        log.info(
            "job %s: %s%s", job_id, status, f" ({fields['error']})" if "error" in fields else ""
        )


def absolute_paths(spec: JobSpec | SweepSpec) -> JobSpec | SweepSpec:
    """Dataset paths as the API checked them: relative to the working directory that the API
    and this worker share. Ray workers start elsewhere, so they get absolute paths."""
    if isinstance(spec, SweepSpec):
        return spec.model_copy(update={"base": absolute_paths(spec.base)})
    data = spec.data
    update = {"root": str(Path(data.root).expanduser().resolve())}
    if data.path:
        update["path"] = str(Path(data.path).expanduser().resolve())
    return spec.model_copy(update={"data": data.model_copy(update=update)})


class ProgressWatcher:
    """Reads a run's latest epoch and metrics back from MLflow, where rank 0 logs them: the
    training workers need no access to the service's database or Redis."""

    def __init__(self, uri: str, run_id: str, start: dict[str, Any], every: float = 2.0) -> None:
        self.client, self.uri = MlflowClient(uri), uri
        self.run_id, self.start, self.every = run_id, start, every
        self.last_poll = 0.0
        self.last_epoch = start["epoch"]

    def due(self, force: bool) -> bool:
        """At most one read of MLflow every ``every`` seconds, unless forced."""
        now = time.monotonic()
        if not force and now - self.last_poll < self.every:
            return False
        self.last_poll = now
        return True

    def poll(self, force: bool = False) -> dict[str, Any] | None:
        if not self.due(force):
            return None
        try:
            epochs = self.client.get_metric_history(self.run_id, "epoch")
            metrics = self.client.get_run(self.run_id).data.metrics
        except Exception as exc:  # the tracking server blinking must not fail the job
            log.warning("progress not read from MLflow: %s", exc)
            return None
        epoch = max((int(m.step) for m in epochs), default=0)
        if epoch == self.last_epoch and not force:
            return None
        self.last_epoch = epoch
        shown = {k: metrics[k] for k in PROGRESS_KEYS if k in metrics}
        return {**self.start, "epoch": epoch, "metrics": shown}


class SweepWatcher(ProgressWatcher):
    """A sweep's progress: its trials as their child MLflow runs show them."""

    def __init__(self, uri: str, run_id: str, start: dict[str, Any], sweep: SweepSpec) -> None:
        super().__init__(uri, run_id, start)
        self.sweep = sweep
        self.seen: list[dict[str, Any]] | None = None

    def poll(self, force: bool = False) -> dict[str, Any] | None:
        if not self.due(force):
            return None
        try:
            trials = self.trials()
        except Exception as exc:  # the tracking server blinking must not fail the job
            log.warning("sweep progress not read from MLflow: %s", exc)
            return None
        if trials == self.seen and not force:
            return None
        self.seen = trials
        done = sum(t["status"] != "running" for t in trials)
        return {
            **self.start,
            "metric": self.sweep.metric,
            "mode": self.sweep.mode,
            "trials": trials,
            "metrics": {"trials_done": float(done), "trials_started": float(len(trials))},
        }

    def trials(self) -> list[dict[str, Any]]:
        from worker.tune import STOPPED_TAG, child_runs

        pick = max if self.sweep.mode == "max" else min
        found = []
        for trial_id, run_id in sorted(child_runs(self.uri, self.run_id).items()):
            run = self.client.get_run(run_id)
            values = [m.value for m in self.client.get_metric_history(run_id, self.sweep.metric)]
            status = {"RUNNING": "running", "FAILED": "failed", "KILLED": "killed"}.get(
                run.info.status, "finished"
            )
            if run.data.tags.get(STOPPED_TAG) == "true":
                status = "stopped"
            params, tags = run.data.params, run.data.tags
            found.append(
                {
                    "trial_id": trial_id,
                    "config": {k: params.get(k, tags.get(f"byol.{k}")) for k in self.sweep.space},
                    "status": status,
                    "best_metric": pick(values) if values else None,
                    "epochs": len(self.client.get_metric_history(run_id, "epoch")),
                    "mlflow_run_id": run_id,
                }
            )
        return found


def main(settings: Settings | None = None, max_jobs: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runner = JobRunner(settings or load_settings())

    def graceful(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current heartbeat, then releasing the job", signum)
        runner.stopping.set()

    runner.connect()  # first: ray.init installs a SIGTERM handler of its own, which exits
    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    runner.serve(max_jobs=max_jobs)


if __name__ == "__main__":
    main()
