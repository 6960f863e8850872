"""A JobSpec as distributed data-parallel training on Ray Train (the V2 API).

One Ray Train worker per ``distributed.workers``; each runs ``byol_core.trainer.Trainer`` on its
share of every global batch, with the online network wrapped in DDP by ``prepare_model`` and
batch norm synchronised across workers when ``distributed.bn_sync='global'``. Rank 0 evaluates
and reports a checkpoint every epoch; Ray Train restarts failed workers from the latest one.

On a laptop Ray starts locally on demand; on a cluster set ``RAY_ADDRESS`` and give a storage
path that every node can reach (shared file system or object store).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from byol_core.errors import ByolError
from byol_core.spec import JobSpec
from worker.ray_cluster import init_ray
from worker.reclaim import ReclaimPlacementGroup

CHECKPOINT_FILE = "checkpoint.pt"
PRECISION_TAG = "byol.precision"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process (torch.distributed is already initialised)."""
    import ray.train.torch as rt

    from byol_core.checkpoint import save_checkpoint
    from byol_core.trainer import Trainer
    from worker.tracking import EpochLogger

    spec = JobSpec.model_validate_json(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    logger = EpochLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None

    def report(epoch: int, metrics: dict[str, float]) -> None:
        # Every worker reports (Ray requires the same number of calls); rank 0 adds the state.
        if logger is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer.state())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # After the checkpoint is safe: a crash here is repaired by backfill on resume.
            logger.log_epoch(metrics)
            every = spec.checkpoint_every
            if (every and epoch % every == 0) or epoch >= spec.epochs:
                logger.log_artifact(path, f"checkpoints/epoch_{epoch:04d}")

    # The worker's own run folder is scratch: Ray Train's storage holds the checkpoints (report),
    # and run_job writes the job's run folder; the trainer writes no files of its own.
    with tempfile.TemporaryDirectory(prefix=f"byol-rank{rank}-") as out_dir:
        trainer = Trainer(
            spec,
            out_dir,
            device=rt.get_device(),
            progress=False,
            on_epoch_end=report,
            wrap_online=rt.prepare_model,
            write_files=False,
        )
        if logger is not None:
            # What precision: auto resolved to on these workers' CPUs (or GPUs), agreed by all.
            logger.set_tag(PRECISION_TAG, "bf16" if trainer.runtime.bf16 else "fp32")
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as directory:
                trainer.restore(Path(directory) / CHECKPOINT_FILE)
            if logger is not None:
                logger.backfill(trainer.history)
        trainer.fit()


class LeanTorchTrainer(TorchTrainer):
    """TorchTrainer without two helper actors, each a process of its own for every run and
    trial, that these runs never use:

    - Ray's placement-group cleaner asks the dashboard's state API whether the controller
      lives; without a dashboard (a Ray this project starts has none) it never acts, and only
      logs "Failed to query Ray Train Controller actor state" every second or two into the
      worker logs a failed run's error points to. ``worker.reclaim``'s janitor does its job.
    - the dataset manager serves Ray Data shards; training here reads its own data.
    """

    def _create_default_callbacks(self) -> list[Any]:
        unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]


def scaling_config(spec: JobSpec) -> ScalingConfig:
    return ScalingConfig(
        num_workers=spec.distributed.workers,
        use_gpu=spec.distributed.use_gpu,
        resources_per_worker={"CPU": spec.distributed.cpus_per_worker},
    )


def run_distributed(
    spec: JobSpec,
    storage_path: str | Path,
    name: str,
    tracking: dict[str, str],
    max_failures: int = 3,
    callbacks: list[Any] | None = None,
) -> ray.train.Result:
    """Train ``spec`` on Ray Train. A run with the same ``name`` and storage resumes from its
    latest checkpoint. ``tracking``: ``mlflow_uri`` and ``mlflow_run_id`` for rank 0.
    ``callbacks``: Ray Train run callbacks (a Tune trial passes its TuneReportCallback)."""
    init_ray()
    trainer = LeanTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump_json(), **tracking},
        scaling_config=scaling_config(spec),
        run_config=RunConfig(
            name=name,
            # Local paths must be absolute for the workers; URIs (s3://, gs://) pass as they are.
            storage_path=str(storage_path)
            if "://" in str(storage_path)
            else str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A controller killed from outside (a Tune trial stopped early, a cancelled job)
            # leaves its workers' placement group behind unless something removes it.
            callbacks=[ReclaimPlacementGroup(), *(callbacks or [])],
        ),
    )
    return trainer.fit()


def run_job(
    spec: JobSpec,
    out_dir: str | Path,
    run_key: str | None = None,
    uri: str | None = None,
    *,
    tags: dict[str, str] | None = None,
    callbacks: list[Any] | None = None,
    storage: str | None = None,
    local: bool | None = None,
) -> dict[str, Any]:
    """A job end to end: its MLflow run (resumed if ``run_key`` ran before), distributed training,
    then the final encoder as an MLflow PyTorch model, the figures, and the run folder
    (checkpoint.pt, metrics.json, curves.png). Returns the one-line summary. ``uri``: the MLflow
    tracking URI (default: ``MLFLOW_TRACKING_URI`` or the embedded store). ``tags`` (of a new
    MLflow run) and ``callbacks`` (of the Ray Train run) are how a sweep's trial runs a job.
    ``storage``: Ray Train's checkpoint storage (default ``BYOL_RAY_STORAGE``, else the run
    folder); ``local``: Ray runs on this machine only (default: no ``RAY_ADDRESS``). The job
    worker passes both, since a Ray task sees its node's environment, not the worker's."""
    import json
    import shutil
    import time

    from byol_core.checkpoint import load_checkpoint
    from byol_core.trainer import summarize, write_report
    from worker.tracking import EpochLogger, start_or_resume_run, tracking_uri

    started = time.perf_counter()
    if local if local is not None else not os.environ.get("RAY_ADDRESS"):
        preflight(spec)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_key = run_key or str(out_dir)
    uri = uri or tracking_uri()
    run_id = start_or_resume_run(spec, run_key, uri, tags=tags)
    logger = EpochLogger(uri, run_id)
    storage = storage or os.environ.get("BYOL_RAY_STORAGE") or out_dir / "ray"
    name = ray_name(run_key)
    try:
        tracking = {"mlflow_uri": uri, "mlflow_run_id": run_id}
        result = run_distributed(spec, storage, name, tracking, callbacks=callbacks)
    except TrainingFailedError as exc:
        logger.finish("FAILED")
        raise user_error(exc) from exc
    final = out_dir / CHECKPOINT_FILE
    with result.checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / CHECKPOINT_FILE, final)
    payload = load_checkpoint(final)
    history = json.loads(payload["history"])
    write_report(spec, history, out_dir)
    logger.log_artifact(out_dir / "curves.png", "figures")
    log_encoder(spec, payload, uri, run_id)
    logger.finish("FINISHED")
    summary = summarize(spec, history, final, time.perf_counter() - started)
    return {**summary, "mlflow_run_id": run_id}


def ray_name(run_key: str) -> str:
    """The Ray run name of a run key: a path component (the key may be a path)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_key)[-100:]


def preflight(spec: JobSpec) -> None:
    """Load the data once in this process before any Ray worker starts. On one machine the
    workers share this process's files, so a missing dataset fails here at once instead of
    after Ray Train's restarts, and a slow first decode fills the cache the workers then read.
    (On a cluster the data may live only on the worker nodes, so this is skipped there.)"""
    from byol_core.data import load_data

    load_data(spec.data, seed=spec.seed)


def user_error(error: BaseException) -> ByolError:
    """The one-line error a user sees for a failed Ray Train run: the ByolError raised inside a
    training worker (a missing dataset, say) when there is one, else the root exception's type
    and message. Ray wraps worker errors in WorkerGroupError / ControllerError / RayTaskError."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    root = error
    while pending:
        exc = pending.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, ByolError):
            return exc
        nested = [
            *getattr(exc, "worker_failures", {}).values(),
            getattr(exc, "controller_failure", None),
            getattr(exc, "cause", None),
            exc.__cause__,
        ]
        children = [e for e in nested if isinstance(e, BaseException)]
        if not children:
            root = exc
        pending.extend(children)
    from byol_core.trainer import TrainingError

    message = str(root).strip().splitlines()
    detail = message[-1] if message else ""
    return TrainingError(
        f"training failed on Ray Train: {type(root).__name__}: {detail} (worker logs: Ray's "
        "session folder, /tmp/ray/session_latest/logs)"
    )


def log_encoder(spec: JobSpec, payload: dict[str, Any], uri: str, run_id: str) -> None:
    """The trained online encoder, as an MLflow PyTorch model named ``encoder``."""
    import mlflow
    import mlflow.pytorch
    import torch

    from byol_core.model import BYOL

    model = BYOL(spec.model)
    # Global-BN runs keep the same parameter and buffer names, so the plain model loads them.
    model.load_state_dict(payload["model"])
    size = spec.augment.crop_size
    # A normalised image batch: the traced (pt2) format needs an example, and it gives the
    # model a signature.
    example = torch.zeros(2, 3, size, size)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model.online.encoder.eval(),
            name="encoder",
            input_example=example.numpy(),
            pip_requirements=encoder_requirements(),
        )


def encoder_requirements() -> list[str]:
    """What loading the encoder needs besides byol_core (whose classes it pickles by
    reference), pinned to this environment. Given explicitly because MLflow's inference loads
    the model again in a subprocess (9-12 CPU-seconds at every job's end on a 2-core EPYC)
    and still missed pydantic, which ``byol_core.networks`` imports, while listing packages
    the encoder never uses (pytorch-lightning, redis, rich)."""
    from importlib.metadata import version

    import mlflow.pytorch

    # Without a local label such as +cpu, as MLflow pins torch: installable from PyPI.
    names = ("torchvision", "pydantic", "numpy")
    ours = [f"{name}=={version(name).split('+')[0]}" for name in names]
    return [*mlflow.pytorch.get_default_pip_requirements(), *ours]


def train_from_cli(spec: JobSpec, out_dir: str | Path) -> dict[str, Any]:
    """``byol train --workers N``: the same run folder a local run leaves behind."""
    return run_job(spec, out_dir)
