"""Time one BYOL training step: ours against the peers and against our own lower bound.

Same work for everyone: torchvision ResNet-18, 64 px, batch 64, two views, projector
512 -> 1024 -> 256 and predictor 256 -> 1024 -> 256 with batch norm, an optimizer step and the
EMA update of the target. Ours runs with its defaults (bf16 autocast where the CPU has it,
channels_last, foreach EMA and optimizer); the peers run as their documentation writes them
(``benchmarks.peers``). The bound: 4/3 of a supervised forward + backward of the same encoder
(ours, same runtime) on the same 2B images, since a BYOL step is an online forward + backward
(3 forward-equivalents) plus a target forward (1). Lever rows re-run ours with one default
switched off. Everything is interleaved in one loop, in a new random order every repeat;
medians are reported. The arithmetic of each step is counted and set against the CPU's peak
rate, timed in the same loop (``benchmarks.roofline``).

    python -m benchmarks.step [--repeats 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import peers
from benchmarks.report import header
from benchmarks.roofline import CONV_SHAPE, MATMUL_SIZE, count_flops, peak_kernels, share_needed
from byol_core.augment import PairAugment
from byol_core.ema import ema_update
from byol_core.losses import BYOLLoss
from byol_core.model import BYOL
from byol_core.networks import build_encoder
from byol_core.optim import build_optimizer
from byol_core.presets import resolve_spec
from byol_core.runtime import Runtime, resolve_runtime
from byol_core.small_map_conv import SmallMapConv2d
from byol_core.spec import JobSpec
from byol_core.trainer import train_step

BATCH, SIZE = 64, 64
TARGETS = {"lightly": 2.0, "byol-pytorch": 3.0}
BOUND_TARGET = 1.25
Step = Callable[[], None]


def step_spec(*overrides: str) -> JobSpec:
    """The cpu preset resized to the comparison's model: ResNet-18 with torchvision's stem."""
    return resolve_spec(
        overrides=[
            f"batch_size={BATCH}",
            "model.encoder.small_stem=false",
            "model.encoder.width=64",
            "model.projector.hidden_dim=1024",
            "model.predictor.hidden_dim=1024",
            "model.projection_dim=256",
            f"augment.crop_size={SIZE}",
            f"data.image_size={SIZE}",
            *overrides,
        ]
    )


def augmented_views() -> list[torch.Tensor]:
    """The comparison's two views: a random uint8 batch through our augmentation, seeded."""
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    return list(PairAugment(step_spec().augment)(images, torch.Generator().manual_seed(0)))


def ours_step(
    views: list[torch.Tensor],
    *overrides: str,
    sync: bool = False,
    passes: str = "auto",
    small_maps: bool = True,
) -> Step:
    """Our step (``train_step`` + foreach EMA) as the Trainer runs it. ``sync``: also read the
    loss and diagnostics on the host every step, as a loop with per-step ``.item()`` would.
    ``passes``: how the views go through the networks (``Online.view_passes``).
    ``small_maps=False``: torch's own convolution on small maps too (``SmallMapConv2d``)."""
    spec = step_spec(*overrides)
    runtime = resolve_runtime(spec.runtime)
    torch.manual_seed(0)
    model = BYOL(spec.model)
    model.online.view_passes = model.target.view_passes = passes
    if not small_maps:
        for m in model.modules():
            if isinstance(m, SmallMapConv2d):
                m.max_positions = 0
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = BYOLLoss()
    opt = build_optimizer(model.online, spec.optim, lr=0.06)
    pairs = model.target_pairs()

    def step() -> None:
        loss, stats = train_step(model.online, model.target, loss_fn, opt, views, runtime)
        ema_update(*pairs, 0.99)
        if sync:
            loss.item()
            stats.tolist()

    return step


def supervised_step(images: torch.Tensor, runtime: Runtime) -> Step:
    """Forward + backward of our encoder (plus a linear classifier) on ``images``, in our
    runtime: the floor under a step that must also run a target forward."""
    torch.manual_seed(0)
    encoder = build_encoder(step_spec().model.encoder)
    net = nn.Sequential(encoder, nn.Linear(encoder.out_dim, 10))
    if runtime.channels_last:
        net.to(memory_format=torch.channels_last)
    x = runtime.to_input(images)
    labels = torch.randint(0, 10, (images.shape[0],))

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = F.cross_entropy(net(x), labels)
        loss.backward()

    return step


@dataclass
class StepResult:
    repeats: int
    runtime: Runtime
    seconds: dict[str, float] = field(default_factory=dict)
    # Every repeat's time per row, in repeat order: the ratios of one repeat are paired (the
    # rows ran back to back), so their spread shows how settled a median ratio is.
    samples: dict[str, list[float]] = field(default_factory=dict)
    # Arithmetic of one step per row (FlopCounterMode) and the peak kernel rate (FLOP/s) per
    # precision, measured in the same process (``benchmarks.roofline``).
    flops: dict[str, int] = field(default_factory=dict)
    ceilings: dict[str, float] = field(default_factory=dict)

    def images_per_s(self, name: str) -> float:
        return 2 * BATCH / self.seconds[name]

    @property
    def bound(self) -> float:
        return 4 / 3 * self.seconds["supervised"]

    def ratio(self, peer: str) -> float:
        return self.seconds[peer] / self.seconds["ours"]

    def ratio_range(self, peer: str) -> tuple[float, float]:
        """The lowest and highest of the per-repeat ratios peer / ours (the median ratio's
        range when only medians were kept)."""
        pairs = zip(self.samples.get(peer, []), self.samples.get("ours", []), strict=True)
        ratios = [p / o for p, o in pairs] or [self.ratio(peer)]
        return min(ratios), max(ratios)

    def ratio_text(self, peer: str) -> str:
        lo, hi = self.ratio_range(peer)
        return f"{self.ratio(peer):.2f}x (repeats {lo:.2f}-{hi:.2f}x)"

    def straddles(self, peer: str, target: float) -> bool:
        """Whether the repeats fall on both sides of ``target``: then one run's verdict is not
        settled, and a run minutes later may give the other one."""
        lo, hi = self.ratio_range(peer)
        return lo < target <= hi

    def precision(self, name: str) -> str:
        """The precision a row's products run in: ours and the bound in the runtime's, the
        peers as shipped (fp32)."""
        return "bf16" if name in OURS_RUNTIME and self.runtime.bf16 else "fp32"

    def ceiling_share(self, name: str) -> float:
        """A row's arithmetic rate as a share of its precision's peak rate."""
        ceiling = self.ceilings[self.precision(name)]
        return share_needed(self.flops[name], self.seconds[name], ceiling)

    def target_share(self, peer: str, target: float) -> float:
        """The share of our precision's peak rate that our step's arithmetic would
        need for ``target`` x over ``peer``: above 1, no implementation of the same arithmetic
        meets it on this CPU."""
        ceiling = self.ceilings[self.precision("ours")]
        return share_needed(self.flops["ours"], self.seconds[peer] / target, ceiling)


# Rows run in our runtime (bf16 autocast where the CPU has it); the peers run as shipped.
OURS_RUNTIME = ("ours", "supervised")
COUNTED = ("ours", "lightly", "byol-pytorch", "supervised")
ROWS = {
    "ours": "ours (defaults)",
    "lightly": "lightly 1.6.0, its documentation's step (fp32)",
    "byol-pytorch": "byol-pytorch 0.9.1, its README's step (fp32, Adam)",
    "supervised": "supervised forward + backward of our encoder on the 2B images",
    "ours fp32": "lever off: ours in fp32 (no autocast)",
    "ours no channels_last": "lever off: ours without channels_last",
    "ours fp32 no channels_last": "levers off: ours in fp32 without channels_last",
    "ours + host sync": "lever off: ours reading loss and diagnostics with .item() every step",
    "ours one pass": "lever: ours with both views in one pass (per-view BN, `view_bn`)",
    "ours no small maps": "lever off: ours with torch's convolution on small maps (up to 4x4) too",
    "lightly bf16": "lightly's step under the same bf16 autocast + channels_last (not as shipped)",
    "augment": "(not in a step) our augmentation of both views of the 64 uint8 images",
}


def _lightly_fast(x0: torch.Tensor, x1: torch.Tensor, runtime: Runtime) -> Step:
    """lightly's step with our two precision/layout levers applied from outside: how much of
    our lead those levers are (information; the targets are against the peers as shipped)."""
    torch.manual_seed(0)
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    step = peers.lightly_step(
        runtime.to_input(x0), runtime.to_input(x1), prepare=lambda m: m.to(memory_format=layout)
    )

    def run() -> None:
        with runtime.autocast():
            step()

    return run


def measure(repeats: int = 10, levers: bool = True) -> StepResult:
    spec = step_spec()
    runtime = resolve_runtime(spec.runtime)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    augment, gen = PairAugment(spec.augment), torch.Generator().manual_seed(0)
    x0, x1 = augment(images, gen)
    views = [x0, x1]
    torch.manual_seed(0)
    fns: dict[str, Step] = {
        "ours": ours_step(views),
        "lightly": peers.lightly_step(x0, x1),
        "byol-pytorch": peers.byol_pytorch_step(x0),
        "supervised": supervised_step(torch.cat(views), runtime),
        "augment": lambda: augment(images, gen),
    }
    if levers:
        fns["ours fp32"] = ours_step(views, "runtime.precision=fp32")
        fns["ours no channels_last"] = ours_step(views, "runtime.channels_last=false")
        fns["ours fp32 no channels_last"] = ours_step(
            views, "runtime.precision=fp32", "runtime.channels_last=false"
        )
        fns["ours + host sync"] = ours_step(views, sync=True)
        fns["ours one pass"] = ours_step(views, passes="one")
        fns["ours no small maps"] = ours_step(views, small_maps=False)
        fns["lightly bf16"] = _lightly_fast(x0, x1, runtime)
    # The roofline's kernels run in the same loop, so that the ceiling is measured at the
    # machine's speed of the moment, as the rows are.
    precisions = (
        {"fp32": torch.float32, "bf16": torch.bfloat16} if runtime.bf16 else {"fp32": torch.float32}
    )
    peak_rows: dict[str, dict[str, int]] = {}  # precision -> row name -> its operations
    for precision, dtype in precisions.items():
        for kernel, (fn, flops) in peak_kernels(dtype).items():
            name = f"peak {precision} {kernel}"
            fns[name] = fn
            peak_rows.setdefault(precision, {})[name] = flops
    timings: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
        fn()
    # A fresh random order every repeat: in a fixed order the first row came out ~7 % slower
    # than the same code in a later row (what ran just before it matters), which would bias
    # whichever row sits first.
    order = random.Random(0)
    for _ in range(repeats):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            timings[name].append(time.perf_counter() - start)
    result = StepResult(repeats, runtime, samples=timings)
    result.seconds = {k: statistics.median(v) for k, v in timings.items()}
    result.flops = {name: count_flops(fns[name]) for name in COUNTED}
    result.ceilings = {
        precision: max(flops / result.seconds[name] for name, flops in rows.items())
        for precision, rows in peak_rows.items()
    }
    return result


def peer_verdict(
    peer: str, target: float, ratio: float, text: str, straddles: bool, spread: str = "repeats"
) -> str:
    """'- over PEER: **TEXT** (target >= Tx: met)', noting when the ``spread`` (repeats or
    processes) falls on both sides of the target."""
    met = "met" if ratio >= target else "**not met**"
    if straddles:
        met += f", the {spread} straddle it"
    return f"- over {peer}: **{text}** (target >= {target}x: {met})"


# Where the runtime is fp32 (no fast bf16 on the CPU), the rows that name bf16 say what ran.
FP32_ROWS = {
    "ours fp32": "ours in fp32 again (the default here: no fast bf16 on this CPU)",
    "lightly bf16": "lightly's step under the same channels_last, fp32 as ours (not as shipped)",
}


def markdown(r: StepResult) -> str:
    labels = ROWS if r.runtime.bf16 else {**ROWS, **FP32_ROWS}

    def row(name: str) -> str:
        sec = r.seconds[name]
        ips, rel = r.images_per_s(name), sec / r.seconds["ours"]
        return f"| {labels[name]} | {sec * 1e3:.1f} | {ips:.0f} | {rel:.2f} |"

    rows = "\n".join(row(name) for name in ROWS if name in r.seconds)
    verdicts = [
        peer_verdict(peer, target, r.ratio(peer), r.ratio_text(peer), r.straddles(peer, target))
        for peer, target in TARGETS.items()
    ]
    bound_ratio = r.seconds["ours"] / r.bound
    met = "met" if bound_ratio <= BOUND_TARGET else "**not met**"
    verdicts.append(
        f"- against the bound (4/3 x {r.seconds['supervised'] * 1e3:.1f} ms = "
        f"{r.bound * 1e3:.1f} ms): **{bound_ratio:.2f}x** (target <= {BOUND_TARGET}x: {met})"
    )
    precision = "bf16 autocast" if r.runtime.bf16 else "fp32"
    return f"""## 1. One BYOL training step

ResNet-18 (torchvision stem), 64 px, batch 64, two views, MLPs 512 -> 1024 -> 256, optimizer
step and EMA update of the target in every step. Ours: {precision},
channels_last={r.runtime.channels_last}. Median of {r.repeats} repeats, interleaved in random order
(`python -m benchmarks.step`); images/s counts both views (2 x 64 per step); "x ours" is the
row's time over ours.

| what | median ms | images/s | x ours |
|---|---:|---:|---:|
{rows}

{chr(10).join(verdicts)}
{arithmetic(r)}"""


def arithmetic(r: StepResult) -> str:
    """The roofline paragraph: each counted row's rate against the peak rate, and the
    rate each step target would take (empty when the run counted nothing)."""
    if not r.flops or not r.ceilings:
        return ""
    rows = []
    for name in COUNTED:
        precision = r.precision(name)
        rows.append(
            f"| {ROWS[name]} | {r.flops[name] / 1e9:.1f} | "
            f"{r.flops[name] / r.seconds[name] / 1e9:.0f} | "
            f"{100 * r.ceiling_share(name):.0f}% of {precision}'s |"
        )
    rates = ", ".join(f"{p} {c / 1e9:.0f} GFLOP/s" for p, c in sorted(r.ceilings.items()))
    needs = []
    floor = r.ceiling_share("supervised")
    for peer, target in TARGETS.items():
        share = r.target_share(peer, target)
        verdict = (
            "more than the CPU's fastest kernels do: no implementation of the same "
            "arithmetic meets it on this CPU"
            if share > 1
            else f"above the {100 * floor:.0f}% that the supervised forward + backward of the "
            "same encoder reaches: only faster convolution kernels than this CPU's would meet it"
            if share > floor
            else f"within the {100 * floor:.0f}% that the supervised pass of the same encoder "
            "reaches"
        )
        needs.append(
            f"- {target}x over {peer} needs our {r.flops['ours'] / 1e9:.1f} GFLOP in "
            f"{r.seconds[peer] / target * 1e3:.0f} ms: **{100 * share:.0f}%** of the "
            f"{r.precision('ours')} peak rate, {verdict}."
        )
    table = "\n".join(rows)
    return f"""
Arithmetic (`benchmarks.roofline`): one step of each row counted with torch's
`FlopCounterMode` (matrix products and convolutions, forward and backward), against the peak
rate per precision measured in the same run, the faster of a {MATMUL_SIZE} x {MATMUL_SIZE}
matrix product and a 3x3 convolution ({CONV_SHAPE[1]} channels, {CONV_SHAPE[0]} images of
{CONV_SHAPE[2]} x {CONV_SHAPE[3]}, channels_last), each timed in the rows' loop ({rates}).

| what | GFLOP a step | GFLOP/s | of the peak rate |
|---|---:|---:|---:|
{table}

{chr(10).join(needs)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-levers", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(header())
    print(markdown(measure(args.repeats, not args.no_levers)))


if __name__ == "__main__":
    main()
