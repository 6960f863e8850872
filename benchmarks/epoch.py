"""Where one epoch of the CPU-scale study goes: the Trainer run as-is, with timers around its parts.

One epoch of the ``cifar`` base (the CPU-scale study: ResNet-18 at width 16, 32 px, batch 256,
10,000 training images, SGD lr 0.2, linear evaluation on halves of the test set), or the ``cpu``
base resized to it where that base is absent, on the CIFAR-10 ImageFolder at
``../shared/data/cifar10``. Nothing in the Trainer changes: its collaborators are wrapped from
outside (the module's ``train_step``/``ema_update``/``embed``/``evaluate_features``, the model's
``forward`` and the optimizer's ``step`` on the instances). On a CPU every op has finished when
it returns, so wall-clock timers around calls are exact; on a GPU they synchronise first.

    python -m benchmarks.epoch [--data ../shared/data/cifar10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import byol_core.trainer as trainer_module
from benchmarks.report import header
from byol_core.data import load_data
from byol_core.presets import bases, resolve_spec
from byol_core.spec import JobSpec
from byol_core.trainer import Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
# The CPU-scale study, field by field, for a checkout without the ``cifar`` base.
CPU_SCALE = [
    "batch_size=256",
    "data.train_limit=10000",
    "model.projector.hidden_dim=512",
    "model.predictor.hidden_dim=512",
    "model.projection_dim=128",
    "optim.lr=0.2",
    "optim.scale_lr_by_batch=false",
    "ema.tau=0.996",
]


def epoch_spec(data: Path) -> JobSpec:
    common = ["epochs=1", "data.name=imagefolder", f"data.path={data}"]
    if "cifar" in bases():
        return resolve_spec(base="cifar", overrides=[*common, "data.train_limit=10000"])
    return resolve_spec(base="cpu", overrides=[*common, *CPU_SCALE])


@dataclass
class Clock:
    """Accumulated seconds and calls per phase."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


@dataclass
class EpochResult:
    spec: JobSpec
    load_s: float
    fit_s: float
    steps: int
    seconds: dict[str, float]
    metrics: dict[str, float]


def measure(data: Path) -> EpochResult:
    spec = epoch_spec(data)
    start = time.perf_counter()
    splits = load_data(spec.data, seed=spec.seed)
    load_s = time.perf_counter() - start
    clock = Clock()
    patched = {
        name: getattr(trainer_module, name)
        for name in ("train_step", "ema_update", "embed", "evaluate_features", "write_report")
    }
    for name, fn in patched.items():
        setattr(trainer_module, name, clock.wrap(name, fn))
    try:
        with tempfile.TemporaryDirectory() as out:
            t = Trainer(spec, out, data=splits, progress=True)
            clock.device = t.runtime.device
            t.augment = clock.wrap("augment", t.augment)
            t.online.forward = clock.wrap("online forward", t.online.forward)
            t.model.target.forward = clock.wrap("target forward", t.model.target.forward)
            t.optimizer.step = clock.wrap("optimizer step", t.optimizer.step)
            t.save = clock.wrap("checkpoint", t.save)
            start = time.perf_counter()
            t.fit()
            fit_s = time.perf_counter() - start
            steps, metrics = t.steps_per_epoch, t.history[-1]
    finally:
        for name, fn in patched.items():
            setattr(trainer_module, name, fn)
    return EpochResult(spec, load_s, fit_s, steps, dict(clock.seconds), metrics)


def breakdown(r: EpochResult) -> list[tuple[str, float]]:
    """Disjoint phases that add up to the whole ``fit()``."""
    s = r.seconds
    step_rest = s["train_step"] - s["online forward"] - s["target forward"] - s["optimizer step"]
    eval_rest = r.metrics.get("time/eval_s", 0.0) - s["embed"] - s["evaluate_features"]
    rows = [
        ("augmentation (both views, on the device)", s["augment"]),
        ("online forward (both views)", s["online forward"]),
        ("target forward (both views)", s["target forward"]),
        ("loss, backward and diagnostics (rest of `train_step`)", step_rest),
        ("optimizer step (SGD, foreach)", s["optimizer step"]),
        ("EMA update (foreach lerp)", s["ema_update"]),
        ("evaluation: encoder features of the test set", s["embed"]),
        ("evaluation: linear probe + k-NN (scikit-learn)", s["evaluate_features"]),
        ("evaluation: rest", eval_rest),
        ("logging: checkpoint", s["checkpoint"]),
        ("logging: metrics.json + curves.png", s["write_report"]),
    ]
    rows.append(
        (
            "other (loop, schedules, progress bar, epoch metrics)",
            r.fit_s - sum(sec for _, sec in rows),
        )
    )
    return rows


def markdown(r: EpochResult) -> str:
    spec = r.spec
    rows = "\n".join(
        f"| {name} | {sec:.2f} | {100 * sec / r.fit_s:.1f} |" for name, sec in breakdown(r)
    )
    n = r.steps * spec.batch_size
    return f"""## 3. One epoch of the CPU-scale study, where the time goes

`{spec.base}` base (ResNet-18 width {spec.model.encoder.width}, {spec.augment.crop_size} px,
batch {spec.batch_size}, {spec.data.train_limit} training images of the CIFAR-10 ImageFolder,
SGD lr {spec.optim.lr}, linear evaluation `{spec.eval.protocol}` on the test set), one epoch
of `Trainer.fit()` as `byol train` runs it (`python -m benchmarks.epoch`). {r.steps} steps,
{n} images: **{n / r.fit_s:.0f} images/s** over the whole `fit()`, evaluation and logging
included; training alone {r.metrics["train/images_per_s"]:.0f} images/s. Loading the data
(decoded once, then the cache): {r.load_s:.1f} s, before `fit()`.

| phase | seconds | % of fit() |
|---|---:|---:|
{rows}
| **fit() total** | **{r.fit_s:.2f}** | 100 |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"benchmarks.epoch: skipped, no CIFAR-10 ImageFolder at {args.data}")
        return
    print(header())
    print(markdown(measure(args.data)))


if __name__ == "__main__":
    main()
