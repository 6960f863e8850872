"""Time one BYOL training step: ours against the same step written as lightly's docs write it.

Setup (both sides): torchvision ResNet-18, 64 px, batch 64, two views, projector 512 -> 1024 ->
256 and predictor 256 -> 1024 -> 256 with batch norm, SGD momentum, EMA target. Ours runs with
its defaults (bf16 autocast where the CPU has it, channels_last, foreach EMA and optimizer); the
lightly-style step is fp32, per-parameter EMA (lightly's ``update_momentum``), as in its example.
Runs are interleaved and the median is reported. Writes docs/benchmarks.md.

    python -m benchmarks.step [--repeats 15] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from torch import nn

from byol_core.augment import PairAugment
from byol_core.ema import ema_update
from byol_core.losses import BYOLLoss
from byol_core.model import BYOL
from byol_core.optim import build_optimizer
from byol_core.presets import resolve_spec
from byol_core.runtime import resolve_runtime
from byol_core.trainer import train_step

BATCH, SIZE = 64, 64


# --- the lightly documentation's BYOL, transcribed (heads as lightly's BYOLProjectionHead) -----
def _head(i: int, h: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


class LightlyBYOL(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = _head(512, 1024, 256)
        self.prediction_head = _head(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        for m in (self.backbone_momentum, self.projection_head_momentum):
            for p in m.parameters():
                p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()


def _update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    for ema, p in zip(model_ema.parameters(), model.parameters(), strict=True):
        ema.data = ema.data * m + p.data * (1.0 - m)


def _neg_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -nn.functional.cosine_similarity(a, b, dim=1).mean()


def lightly_step(model: LightlyBYOL, opt: torch.optim.Optimizer, x0, x1) -> None:
    _update_momentum(model.backbone, model.backbone_momentum, 0.99)
    _update_momentum(model.projection_head, model.projection_head_momentum, 0.99)
    p0, z0 = model(x0), model.forward_momentum(x0)
    p1, z1 = model(x1), model.forward_momentum(x1)
    loss = 0.5 * (_neg_cos(p0, z1) + _neg_cos(p1, z0))
    loss.backward()
    opt.step()
    opt.zero_grad()


def machine_description() -> str:
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    spec = resolve_spec(
        overrides=[
            f"batch_size={BATCH}",
            "model.encoder.small_stem=false",
            "model.encoder.width=64",
            "model.projector.hidden_dim=1024",
            "model.predictor.hidden_dim=1024",
            "model.projection_dim=256",
            f"augment.crop_size={SIZE}",
            f"data.image_size={SIZE}",
        ]
    )
    runtime = resolve_runtime(spec.runtime)
    ours = BYOL(spec.model)
    if runtime.channels_last:
        ours.to(memory_format=torch.channels_last)
    loss_fn = BYOLLoss()
    opt = build_optimizer(ours.online, spec.optim, lr=0.06)
    pairs = ours.target_pairs()
    ref = LightlyBYOL()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.06)

    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    augment = PairAugment(spec.augment)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = augment(images, gen)

    def run_ours() -> None:
        train_step(ours.online, ours.target, loss_fn, opt, [x0, x1], runtime)
        ema_update(*pairs, 0.99)

    def run_ref() -> None:
        lightly_step(ref, ref_opt, x0, x1)

    def run_aug() -> None:
        augment(images, gen)

    timings: dict[str, list[float]] = {"ours": [], "lightly-style": [], "augment": []}
    fns = {"ours": run_ours, "lightly-style": run_ref, "augment": run_aug}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    ratio = med["lightly-style"] / med["ours"]
    aug_share = med["augment"] / med["ours"]
    rows = [
        ("ours (`train_step` + foreach EMA)", med["ours"]),
        ("lightly documentation style (fp32, per-parameter EMA)", med["lightly-style"]),
        ("both views' augmentation (`PairAugment`, uint8 in)", med["augment"]),
    ]
    table = "\n".join(f"| {name} | {sec * 1e3:.1f} | {2 * BATCH / sec:.0f} |" for name, sec in rows)
    precision = "bf16 autocast" if runtime.bf16 else "fp32"
    report = f"""# Benchmarks

## One BYOL training step

{datetime.now(UTC):%Y-%m-%d}, {machine_description()}, torch {torch.__version__};
ours with {precision}, channels_last={runtime.channels_last}. ResNet-18 (torchvision stem),
64 px, batch 64, two views, MLPs 512 -> 1024 -> 256, EMA target. Median of {args.repeats}
interleaved repeats (`python -m benchmarks.step`).

| what | median ms | images/s (2 views) |
|---|---:|---:|
{table}

Speed-up over the lightly-style step: **{ratio:.2f}x** (target >= 1.6x).
Augmentation of both views: **{100 * aug_share:.1f}%** of our step (target <= 10%).
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
