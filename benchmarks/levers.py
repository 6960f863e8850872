"""Levers the step benchmark cannot switch by a spec field: ``torch.compile``, the optimizer's
and the EMA's implementation. Same model and batch as ``benchmarks.step``.

* optimizer: our LARS class in SGD mode (what training uses) against torch's SGD
  as a for-loop, foreach and fused, on the online network's real gradients, the weights laid
  out as in training (channels_last where the runtime takes it);
* EMA: our one ``_foreach_lerp_`` against a per-parameter loop (lightly's old style);
* ``torch.compile`` of the online and target networks inside our ``train_step``: compile time,
  then the step;
* ``torch.compile`` of the augmentation's three costliest ops (the crop's resampling, the hue
  shift, the blur) on the study's 256 images at 96 px, against the eager pipeline's slices;
* small feature maps: one convolution's forward + backward, torch's against ``SmallMapConv2d``,
  on the last ResNet stage's maps at 64 and 96 px (and one size where torch's is kept), in
  bf16 autocast and in fp32.

    python -m benchmarks.levers [--repeats 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import augmentation
from benchmarks.report import header, interleaved_medians
from benchmarks.step import BATCH, augmented_views, step_spec
from byol_core import augment
from byol_core.augment import ViewAugment
from byol_core.ema import ema_update
from byol_core.losses import BYOLLoss
from byol_core.model import BYOL
from byol_core.optim import build_optimizer
from byol_core.presets import resolve_spec
from byol_core.runtime import resolve_runtime
from byol_core.small_map_conv import SmallMapConv2d
from byol_core.trainer import train_step


def _median_ms(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    return {k: 1e3 * s for k, s in interleaved_medians(fns, repeats).items()}


def _model_and_views() -> tuple[BYOL, list[torch.Tensor]]:
    spec = step_spec()
    torch.manual_seed(0)
    model = BYOL(spec.model)
    return model, augmented_views()


def optimizer_and_ema(repeats: int) -> dict[str, float]:
    spec = step_spec()
    model, views = _model_and_views()
    runtime = resolve_runtime(spec.runtime)
    if runtime.channels_last:  # the weights' layout in training, which the kernels see
        model.to(memory_format=torch.channels_last)
    ours = build_optimizer(model.online, spec.optim, lr=0.06)
    train_step(model.online, model.target, BYOLLoss(), ours, views, runtime)  # real gradients
    params = [p for p in model.online.parameters() if p.grad is not None]
    torch_sgd = {
        impl: torch.optim.SGD(
            params,
            lr=0.06,
            momentum=0.9,
            weight_decay=1e-4,
            foreach=impl == "foreach",
            fused=impl == "fused",
        )
        for impl in ("for-loop", "foreach", "fused")
    }
    target, online = model.target_pairs()

    def ema_loop() -> None:
        with torch.no_grad():
            for t, o in zip(target, online, strict=True):
                t.mul_(0.99).add_(o, alpha=0.01)

    foreach = build_optimizer(model.online, spec.optim, lr=0.06)
    foreach.fused = False
    fns: dict[str, Callable[[], None]] = {
        "optimizer: ours (LARS class, SGD mode)": ours.step,
        "optimizer: ours, foreach instead of the fused kernel": foreach.step,
    }
    fns.update({f"optimizer: torch SGD {impl}": opt.step for impl, opt in torch_sgd.items()})
    fns["EMA: ours (one foreach lerp)"] = lambda: ema_update(target, online, 0.99)
    fns["EMA: per-parameter loop"] = ema_loop
    return _median_ms(fns, repeats)


def compiled_step(repeats: int) -> dict[str, float]:
    """Eager against ``torch.compile`` (default mode) of both networks, in our runtime."""
    spec = step_spec()
    runtime = resolve_runtime(spec.runtime)
    out: dict[str, float] = {}
    fns = {}
    for compiled in (False, True):
        model, views = _model_and_views()
        if runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        online, target = model.online, model.target
        if compiled:
            online, target = torch.compile(online), torch.compile(target)
        opt = build_optimizer(model.online, spec.optim, lr=0.06)
        pairs, loss_fn = model.target_pairs(), BYOLLoss()

        def step(
            online=online, target=target, opt=opt, pairs=pairs, loss_fn=loss_fn, views=views
        ) -> None:
            train_step(online, target, loss_fn, opt, views, runtime)
            ema_update(*pairs, 0.99)

        start = time.perf_counter()
        step()  # compiles, for the compiled one
        name = "torch.compile" if compiled else "eager"
        out[f"{name}: first step (compilation)"] = 1e3 * (time.perf_counter() - start)
        fns[f"{name}: step"] = step
    out.update(_median_ms(fns, repeats))
    return out


def compiled_augment(repeats: int) -> dict[str, float]:
    """Eager (in the pipeline's CPU slices, as ``ViewAugment.apply`` runs them) against
    ``torch.compile`` (whole batch, static shapes) of one view's crop, hue shift and blur."""
    spec = resolve_spec(base="study").augment
    n, size = augmentation.N_IMAGES, augmentation.SIZE
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    view = ViewAugment(spec, 0)
    params = view.sample(n, size, size, "cpu", torch.Generator().manual_seed(0))
    grid = augment._crop_grid(params.boxes, params.flip, size, size, spec.crop_size)
    x = torch.rand(n, 3, spec.crop_size, spec.crop_size)
    hue, weight = params.factors[:, augment.HUE], params.jitter.float()
    kernels = augment.gaussian_kernels(params.sigma, view.kernel_size)

    def shift_hue(x: torch.Tensor, hue: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return augment._hue_(x.clone(), hue, weight)

    ops = {
        "crop (grid_sample)": (augment._resample, (images, grid)),
        "hue shift": (shift_hue, (x, hue, weight)),
        "blur": (augment.gaussian_blur, (x, kernels)),
    }
    step = augment._cpu_slice(spec.crop_size)
    out: dict[str, float] = {}
    fns: dict[str, Callable[[], None]] = {}
    for name, (fn, args) in ops.items():

        def sliced(fn=fn, args=args) -> None:
            for start in range(0, n, step):
                fn(*(a[start : start + step] for a in args))

        compiled = torch.compile(fn, dynamic=False)
        start = time.perf_counter()
        compiled(*args)
        out[f"augment compiled: {name} (compilation)"] = 1e3 * (time.perf_counter() - start)
        fns[f"augment eager: {name}"] = sliced
        fns[f"augment compiled: {name}"] = lambda compiled=compiled, args=args: compiled(*args)
    out.update(_median_ms(fns, repeats))
    return out


# (in channels, out channels, input side, stride): ResNet-18's last stage at 64 px (2x2 out) and
# 96 px (3x3 out), its third stage at 64 px (4x4 out), and 8x8 maps, where torch's convolution
# is kept throughout.
SMALL_MAP_SHAPES = (
    (512, 512, 2, 1), (256, 512, 4, 2), (512, 512, 3, 1), (256, 512, 6, 2),
    (256, 256, 4, 1), (128, 256, 8, 2), (512, 512, 4, 1), (128, 128, 8, 1),
)  # fmt: skip


def small_map_key(precision: str, shape: tuple[int, int, int, int], impl: str) -> str:
    cin, cout, side, stride = shape
    return f"small maps {precision} {cin}->{cout} {side}x{side}/{stride}: {impl}"


def small_map_convs(repeats: int) -> dict[str, float]:
    """Forward + backward (input and weight gradients) of one 3x3 convolution on the step
    benchmark's batch, torch's ``nn.Conv2d`` against ``SmallMapConv2d``, channels_last."""
    fns: dict[str, Callable[[], None]] = {}
    for precision in ("bf16", "fp32"):
        for shape in SMALL_MAP_SHAPES:
            cin, cout, side, stride = shape
            torch.manual_seed(0)
            plain = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            ours = SmallMapConv2d(cin, cout, 3, stride, 1, bias=False)
            ours.load_state_dict(plain.state_dict())
            layout = torch.channels_last
            x = torch.randn(BATCH, cin, side, side).contiguous(memory_format=layout)
            x.requires_grad_(True)
            for impl, conv in (("torch", plain), ("ours", ours)):
                conv.to(memory_format=layout)

                def run(conv=conv, x=x, bf16=precision == "bf16") -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        y = conv(x)
                    y.backward(torch.ones_like(y, memory_format=torch.channels_last))

                fns[small_map_key(precision, shape, impl)] = run
    return _median_ms(fns, repeats)


def markdown(results: dict[str, float]) -> str:
    rows = "\n".join(f"| {name} | {ms:.2f} |" for name, ms in results.items())
    return f"""### Levers measured outside the step table (`python -m benchmarks.levers`)

| what | median ms |
|---|---:|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    results = optimizer_and_ema(args.repeats)
    if not args.no_compile:
        results.update(compiled_step(args.repeats))
        results.update(compiled_augment(args.repeats))
    results.update(small_map_convs(args.repeats))
    print(header())
    print(markdown(results))


if __name__ == "__main__":
    main()
