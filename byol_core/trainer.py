"""The training loop for one process: a JobSpec in, per-epoch metrics and a checkpoint out.

The pieces (``build``, ``train_step``, ``Trainer.evaluate``) are what distributed workers reuse;
this module knows nothing about Ray, MLflow or the service.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from byol_core.augment import PairAugment
from byol_core.checkpoint import load_checkpoint, save_checkpoint
from byol_core.data import DataSplits, load_data
from byol_core.diagnostics import Collapse, batch_stats, trust_ratios
from byol_core.ema import ema_update
from byol_core.errors import ByolError
from byol_core.evaluation import embed, evaluate_features
from byol_core.losses import build_loss
from byol_core.model import BYOL, Target
from byol_core.optim import build_optimizer, set_lr
from byol_core.plots import plot_history
from byol_core.runtime import Runtime, agree_on_bf16, keep_heap, resolve_runtime
from byol_core.schedules import learning_rate, scaled_lr, target_decay
from byol_core.small_map_conv import cast_once
from byol_core.spec import JobSpec
from byol_core.sync_bn import convert_sync_batchnorm

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingError(ByolError):
    """A run that cannot start or go on, with a message for the user."""


def build(
    spec: JobSpec, device: torch.device, global_bn: bool = False
) -> tuple[BYOL, nn.Module, torch.optim.Optimizer]:
    """Model, loss and optimizer for a spec, seeded so that the same spec builds the same net.

    ``global_bn``: batch statistics over every process of the default group, in the online and
    the target networks (the spec's ``distributed.bn_sync='global'``).
    """
    torch.manual_seed(spec.seed)
    model = BYOL(spec.model)
    if global_bn:
        shared_memory = spec.distributed.shared_memory
        model.online = convert_sync_batchnorm(model.online, shared_memory=shared_memory)
        model.target = convert_sync_batchnorm(model.target, shared_memory=shared_memory)
    model = model.to(device)
    loss_fn = build_loss(
        spec.loss.kind, spec.model.projection_dim, spec.loss.temperature, spec.loss.queue_size
    ).to(device)
    base_lr = scaled_lr(spec.optim.lr, spec.batch_size, spec.optim.scale_lr_by_batch)
    optimizer = build_optimizer(model.online, spec.optim, base_lr)
    return model, loss_fn, optimizer


def train_step(
    online: nn.Module,
    target: Target,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    runtime: Runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step of the online network. Returns (loss, collapse stats), both still on
    the device: nothing here waits for the device, so steps queue up back to back.

    ``online`` may be a DDP wrapper; the EMA update of the target is the caller's, after this.
    """
    views = [runtime.to_input(v) for v in views]
    # cast_once: the weights do not change until optimizer.step() below
    with runtime.autocast(), cast_once():
        z, p = online(views)
        z_target = target(views)
        loss = loss_fn(p, z_target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), batch_stats(z, z_target)


class Trainer:
    """Runs a JobSpec in this process on CPU or one GPU."""

    def __init__(
        self,
        spec: JobSpec,
        out_dir: str | Path,
        *,
        data: DataSplits | None = None,
        device: torch.device | None = None,
        progress: bool = True,
        on_epoch_end: EpochCallback | None = None,
        wrap_online: Callable[[nn.Module], nn.Module] | None = None,
        write_files: bool = True,
    ) -> None:
        """``wrap_online`` wraps the online network for data-parallel training (e.g. Ray's
        ``prepare_model``); with torch.distributed initialised each process trains on its
        share of every global batch. ``write_files=False``: rank 0 writes nothing into
        ``out_dir`` (no checkpoints, metrics.json or curves.png), for a caller that keeps the
        state itself (Ray Train's checkpoints) and would only throw the folder away."""
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.write_files = write_files
        self.runtime = resolve_runtime(spec.runtime, device)
        self.data = data if data is not None else load_data(spec.data, seed=spec.seed)
        self.progress = progress
        self.on_epoch_end = on_epoch_end
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        if distributed and spec.runtime.precision == "auto":
            self.runtime = agree_on_bf16(self.runtime)
        global_bn = self.world_size > 1 and spec.distributed.bn_sync == "global"
        if self.runtime.device.type == "cpu":
            # Freed activations come back as page faults every step, and under global batch
            # norm at moments that hold up every process (keep_heap).
            keep_heap()
        self.model, self.loss_fn, self.optimizer = build(spec, self.runtime.device, global_bn)
        if self.runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.online = wrap_online(self.model.online) if wrap_online else self.model.online
        self.augment = PairAugment(spec.augment)
        # Each process draws its own augmentations; the batch order is shared (same seed).
        self.generator = torch.Generator(self.runtime.device).manual_seed(
            spec.seed + 1 + 7919 * self.rank
        )
        self.ema_pairs = self.model.target_pairs()
        self.epoch = 0
        self.step = 0
        # Per-epoch metrics, kept in the checkpoint so a resumed run reports each epoch once.
        self.history: list[dict[str, float]] = []
        n = self.data.pretrain.images.shape[0]
        self.steps_per_epoch = n // spec.batch_size
        self.local_batch = spec.batch_size // self.world_size
        if spec.pretrain and self.steps_per_epoch == 0:
            raise TrainingError(
                f"the pre-training set has {n} images, fewer than batch_size={spec.batch_size}"
            )
        self.total_steps = max(1, spec.epochs * self.steps_per_epoch)
        self.base_lr = scaled_lr(spec.optim.lr, spec.batch_size, spec.optim.scale_lr_by_batch)
        self.warmup_steps = round(spec.optim.warmup_epochs * self.steps_per_epoch)
        # Held on the training device once: batches are index lookups, not loader round trips.
        self.pretrain_images = self.data.pretrain.images.to(self.runtime.device)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def state(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump_json(),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "augment": self.generator.get_state()},
            "history": json.dumps(self.history),
        }

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_path, self.state())

    def restore(self, path: str | Path) -> None:
        payload = load_checkpoint(path, map_location=self.runtime.device)
        saved = JobSpec.model_validate_json(payload["spec"])
        if saved.model != self.spec.model:
            raise TrainingError(f"checkpoint {str(path)!r} was written for another model spec")
        self.model.load_state_dict(payload["model"])
        self.loss_fn.load_state_dict(payload["loss"])
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"]["torch"].cpu())
        self.generator.set_state(payload["rng"]["augment"].cpu())
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.history = json.loads(payload["history"])

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs (evaluating as the spec says) and return the summary."""
        started = time.perf_counter()
        if not self.spec.pretrain:
            if not self.history:
                self._end_epoch(0, {**self.evaluate(), **self.collapse_probe()})
        else:
            while self.epoch < self.spec.epochs:
                self._end_epoch(self.epoch + 1, self.train_epoch())
        path = None
        if self.rank == 0 and self.write_files:
            path = self.save()
            self.write_report()
        return self.summary(path, time.perf_counter() - started)

    def write_report(self) -> None:
        write_report(self.spec, self.history, self.out_dir)

    def _end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epoch = epoch
        # Evaluation and checkpoints are rank 0's; the others go on to the next collective.
        if self.rank == 0 and self._eval_due(epoch) and "eval/linear_top1" not in metrics:
            metrics.update(self.evaluate())
        metrics["epoch"] = epoch
        self.history.append(metrics)
        every = self.spec.checkpoint_every
        if self.rank == 0 and self.write_files and every and epoch % every == 0:
            self.save()
        if self.on_epoch_end:
            self.on_epoch_end(epoch, metrics)

    def _eval_due(self, epoch: int) -> bool:
        every = self.spec.eval.every
        return epoch >= self.spec.epochs or bool(every and epoch % every == 0)

    def _batches(self, epoch: int) -> torch.Tensor:
        # A permutation that depends only on (seed, epoch): a resumed run sees the same order.
        g = torch.Generator().manual_seed(self.spec.seed * 100_003 + epoch)
        order = torch.randperm(self.pretrain_images.shape[0], generator=g)
        usable = self.steps_per_epoch * self.spec.batch_size
        batches = order[:usable].view(self.steps_per_epoch, self.spec.batch_size)
        # This process's contiguous share of every global batch.
        start = self.rank * self.local_batch
        return batches[:, start : start + self.local_batch]

    def train_epoch(self) -> dict[str, float]:
        spec, model = self.spec, self.model
        model.train()
        collapse = Collapse()
        loss_sum = torch.zeros((), device=self.runtime.device)
        started = time.perf_counter()
        lr = tau = 0.0
        bar = tqdm(
            self._batches(self.epoch + 1).to(self.runtime.device),
            desc=f"epoch {self.epoch + 1}/{spec.epochs}",
            unit="step",
            disable=not self.progress,
            leave=False,
            file=sys.stderr,
        )
        for idx in bar:
            lr = learning_rate(
                self.step, self.total_steps, self.base_lr, self.warmup_steps, spec.optim.schedule
            )
            tau = target_decay(self.step, self.total_steps, spec.ema.tau, spec.ema.schedule)
            set_lr(self.optimizer, lr)
            views = list(self.augment(self.pretrain_images[idx], self.generator))
            loss, stats = train_step(
                self.online, model.target, self.loss_fn, self.optimizer, views, self.runtime
            )
            ema_update(*self.ema_pairs, tau)
            loss_sum += loss
            collapse.update(stats)
            self.step += 1
        seconds = time.perf_counter() - started
        loss_sum, collapse = self._mean_over_processes(loss_sum, collapse)
        metrics = {
            "train/loss": float(loss_sum) / self.steps_per_epoch,
            "train/lr": lr,
            "train/tau": tau,
            "train/images_per_s": self.steps_per_epoch * spec.batch_size / seconds,
            "time/epoch_s": seconds,
        }
        if not math.isfinite(metrics["train/loss"]):
            raise TrainingError(
                f"the loss became {metrics['train/loss']} in epoch {self.epoch + 1}; "
                "lower optim.lr or use precision fp32"
            )
        metrics.update({f"diag/{k}": v for k, v in collapse.result().items()})
        for name, ratio in trust_ratios(self.optimizer, model.online).items():
            metrics[f"lars/trust/{name}"] = ratio
        return metrics

    def _mean_over_processes(
        self, loss_sum: torch.Tensor, collapse: Collapse
    ) -> tuple[torch.Tensor, Collapse]:
        """Average the epoch's loss and diagnostics over all processes, in one collective."""
        if self.world_size == 1 or collapse.total is None:
            return loss_sum, collapse
        packed = torch.cat([loss_sum.reshape(1), collapse.total]) / self.world_size
        dist.all_reduce(packed)
        collapse.total = packed[1:]
        return packed[0], collapse

    @torch.no_grad()
    def collapse_probe(self) -> dict[str, float]:
        """Collapse diagnostics without training (for the untrained-encoder baseline): one batch."""
        n = min(self.spec.batch_size, self.pretrain_images.shape[0])
        views = [
            self.runtime.to_input(v) for v in self.augment(self.pretrain_images[:n], self.generator)
        ]
        with self.runtime.autocast():
            z, _ = self.model.online(views)
            z_target = self.model.target(views)
        return {
            f"diag/{k}": v
            for k, v in zip(Collapse.names, batch_stats(z, z_target).tolist(), strict=True)
        }

    def evaluate(self) -> dict[str, float]:
        spec, data = self.spec, self.data
        started = time.perf_counter()
        kwargs = dict(
            size=spec.augment.crop_size,
            mean=spec.augment.mean,
            std=spec.augment.std,
            device=self.runtime.device,
            autocast=self.runtime.autocast(),
            channels_last=self.runtime.channels_last,
        )
        encoder = self.model.online.encoder
        test = (embed(encoder, data.test.images, **kwargs), data.test.labels.numpy())
        train = None
        if spec.eval.protocol == "standard":
            train = (embed(encoder, data.train.images, **kwargs), data.train.labels.numpy())
        result = evaluate_features(
            protocol=spec.eval.protocol,
            test=test,
            train=train,
            knn_k=spec.eval.knn_k,
            C=spec.eval.C,
            max_iter=spec.eval.max_iter,
            seed=spec.seed,
        )
        metrics = {f"eval/{k}": v for k, v in result.items()}
        metrics["time/eval_s"] = time.perf_counter() - started
        return metrics

    def summary(self, checkpoint: Path | None, seconds: float) -> dict[str, Any]:
        return summarize(self.spec, self.history, checkpoint, seconds)


def write_report(spec: JobSpec, history: list[dict[str, float]], out_dir: str | Path) -> None:
    """metrics.json and curves.png in the run folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out_dir / "curves.png", f"{spec.name} ({spec.base}/{spec.variant})")


def summarize(
    spec: JobSpec, history: list[dict[str, float]], checkpoint: str | Path | None, seconds: float
) -> dict[str, Any]:
    """The run's one-line result: final evaluation and the last epoch's collapse diagnostics."""
    last = history[-1] if history else {}
    evals = [m for m in history if "eval/linear_top1" in m]
    final_eval = evals[-1] if evals else {}
    return {
        "name": spec.name,
        "variant": spec.variant,
        "epochs": int(last.get("epoch", 0)),
        "linear_top1": final_eval.get("eval/linear_top1"),
        "knn_top1": final_eval.get("eval/knn_top1"),
        "cos_pos": last.get("diag/cos_pos"),
        "cos_neg": last.get("diag/cos_neg"),
        "z_std": last.get("diag/z_std"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "seconds": round(seconds, 2),
    }
