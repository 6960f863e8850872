"""Time the study's augmentation pair: ours (batched tensor ops on the device) against
torchvision's per-sample pipeline in a DataLoader with 2 workers.

The study's pipeline (``study`` preset: 96 px, RandomResizedCrop(0.2, 1), flip, ColorJitter
0.4/0.4/0.4/0.1 with p=0.8, grayscale 0.2, blur 0.5 with sigma in [0.1, 2]) on 256 uint8
images of 96 x 96, both views, normalised float out. torchvision's side is the usual way to
write it: PIL images from an in-memory array (as torchvision's STL10 dataset serves them),
``transforms.v2`` per image, batches of 64 collated by a DataLoader with persistent workers so
that the workers' start-up is not counted. Interleaved repeats, medians.

    python -m benchmarks.augmentation [--repeats 7]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from benchmarks.report import header, interleaved_medians
from byol_core.augment import PairAugment, blur_kernel_size
from byol_core.presets import resolve_spec
from byol_core.spec import AugmentSpec

N_IMAGES, SIZE, LOADER_BATCH, WORKERS = 256, 96, 64, 2
SPEEDUP_TARGET, SHARE_TARGET = 10.0, 0.10


def torchvision_view(spec: AugmentSpec, view: int) -> T.Compose:
    """One view of the pair as torchvision transforms, the same ops and probabilities."""
    ops: list[T.Transform] = [
        T.RandomResizedCrop(spec.crop_size, scale=spec.crop_scale),
        T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply(
            [T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
            p=spec.jitter_p,
        ),
        T.RandomGrayscale(spec.grayscale_p),
    ]
    if spec.blur_p[view] > 0:
        kernel = blur_kernel_size(spec.blur_sigma[1], spec.crop_size)
        ops.append(T.RandomApply([T.GaussianBlur(kernel, spec.blur_sigma)], p=spec.blur_p[view]))
    if spec.solarize_p[view] > 0:
        ops.append(T.RandomSolarize(128, p=spec.solarize_p[view]))
    ops += [
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(spec.mean, spec.std),
    ]
    return T.Compose(ops)


class PairDataset(Dataset):
    """uint8 HWC images served as PIL, both views transformed per image."""

    def __init__(self, images: np.ndarray, spec: AugmentSpec) -> None:
        self.images = images
        self.views = (torchvision_view(spec, 0), torchvision_view(spec, 1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[i])
        return self.views[0](image), self.views[1](image)


@dataclass
class AugmentResult:
    repeats: int
    ours_s: float
    torchvision_s: float
    # Ours with the CPU slices one after another, each op on torch's intra-op threads.
    op_by_op_s: float | None = None

    @property
    def speedup(self) -> float:
        return self.torchvision_s / self.ours_s


def measure(repeats: int = 7) -> AugmentResult:
    spec = resolve_spec(base="study").augment
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    ours, op_by_op = PairAugment(spec), PairAugment(spec)
    for view in op_by_op.views:
        view.slice_threads = 1
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        PairDataset(hwc, spec),
        batch_size=LOADER_BATCH,
        num_workers=WORKERS,
        persistent_workers=True,
        shuffle=True,
    )

    def run_ours() -> None:
        ours(images, gen)

    def run_op_by_op() -> None:
        op_by_op(images, gen)

    def run_torchvision() -> None:
        for _ in loader:
            pass

    # The warm-up call also starts the loader's workers.
    med = interleaved_medians(
        {"ours": run_ours, "op by op": run_op_by_op, "torchvision": run_torchvision}, repeats
    )
    return AugmentResult(repeats, med["ours"], med["torchvision"], med["op by op"])


def markdown(r: AugmentResult, step_s: float | None, step_aug_s: float | None) -> str:
    met = "met" if r.speedup >= SPEEDUP_TARGET else "**not met**"
    threads = torch.get_num_threads()
    lines = [
        "## 2. Augmentation",
        "",
        f"The study's pair (96 px) on {N_IMAGES} uint8 images of {SIZE} x {SIZE}, both views. "
        f"Median of {r.repeats} interleaved repeats (`python -m benchmarks.augmentation`).",
        "",
        "| what | median ms | images/s (pairs) |",
        "|---|---:|---:|",
        f"| ours: `PairAugment`, batched on the device (CPU), its slices on {threads} "
        f"threads | {r.ours_s * 1e3:.1f} | "
        f"{N_IMAGES / r.ours_s:.0f} |",
    ]
    if r.op_by_op_s is not None:
        lines.append(
            f"| ours, its slices one after another, each op on torch's {threads} intra-op "
            f"threads | {r.op_by_op_s * 1e3:.1f} | {N_IMAGES / r.op_by_op_s:.0f} |"
        )
    lines += [
        f"| torchvision `transforms.v2` per image (PIL), DataLoader, {WORKERS} workers | "
        f"{r.torchvision_s * 1e3:.1f} | {N_IMAGES / r.torchvision_s:.0f} |",
        "",
        f"- speed-up: **{r.speedup:.1f}x** (target >= {SPEEDUP_TARGET:.0f}x: {met})",
    ]
    if r.op_by_op_s is not None:
        lines.append(
            f"- slices on {threads} threads, one intra-op thread each, against op by op on "
            f"torch's threads: {r.op_by_op_s / r.ours_s:.2f}x"
        )
    if step_s and step_aug_s:
        share = step_aug_s / step_s
        met = "met" if share <= SHARE_TARGET else "**not met**"
        lines.append(
            f"- in the step benchmark's setting (64 images, 64 px, cpu-preset pair): "
            f"{step_aug_s * 1e3:.1f} ms against a {step_s * 1e3:.1f} ms step, "
            f"**{100 * share:.1f}%** (target <= {100 * SHARE_TARGET:.0f}%: {met})"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(header())
    print(markdown(measure(args.repeats), None, None))


if __name__ == "__main__":
    main()
