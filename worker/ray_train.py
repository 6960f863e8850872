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
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from byol_core.spec import JobSpec

CHECKPOINT_FILE = "checkpoint.pt"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process (torch.distributed is already initialised)."""
    import ray.train.torch as rt

    from byol_core.checkpoint import save_checkpoint
    from byol_core.trainer import Trainer

    spec = JobSpec.model_validate_json(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(tempfile.mkdtemp(prefix=f"byol-rank{rank}-"))

    def report(epoch: int, metrics: dict[str, float]) -> None:
        # Every worker reports (Ray requires the same number of calls); rank 0 adds the state.
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CHECKPOINT_FILE, trainer.state())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    trainer = Trainer(
        spec,
        out_dir,
        device=rt.get_device(),
        progress=False,
        on_epoch_end=report,
        wrap_online=rt.prepare_model,
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.restore(Path(directory) / CHECKPOINT_FILE)
    trainer.fit()


def scaling_config(spec: JobSpec) -> ScalingConfig:
    return ScalingConfig(
        num_workers=spec.distributed.workers,
        use_gpu=spec.distributed.use_gpu,
        resources_per_worker={"CPU": spec.distributed.cpus_per_worker},
    )


def run_distributed(
    spec: JobSpec, storage_path: str | Path, name: str | None = None, max_failures: int = 3
) -> ray.train.Result:
    """Train ``spec`` on Ray Train. A run with the same ``name`` and storage resumes from its
    latest checkpoint."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump_json()},
        scaling_config=scaling_config(spec),
        run_config=RunConfig(
            name=name or spec.name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def train_from_cli(spec: JobSpec, out_dir: str | Path) -> dict[str, Any]:
    """``byol train --workers N``: run on Ray, then leave the usual run folder behind
    (checkpoint.pt, metrics.json, curves.png) and return the one-line summary."""
    import json
    import shutil
    import time

    from byol_core.checkpoint import load_checkpoint
    from byol_core.trainer import summarize, write_report

    started = time.perf_counter()
    out_dir = Path(out_dir)
    result = run_distributed(spec, os.environ.get("BYOL_RAY_STORAGE", out_dir / "ray"))
    if result.error:
        raise result.error
    final = out_dir / CHECKPOINT_FILE
    with result.checkpoint.as_directory() as directory:
        shutil.copyfile(Path(directory) / CHECKPOINT_FILE, final)
    history = json.loads(load_checkpoint(final)["history"])
    write_report(spec, history, out_dir)
    return summarize(spec, history, final, time.perf_counter() - started)
