"""How close a step runs to this CPU's arithmetic ceiling, and how close a target would need it.

A step's arithmetic is counted once with torch's ``FlopCounterMode`` (the matrix products and
convolutions of the forward and backward passes; elementwise work, batch norm and the optimizer
count nothing). The ceiling is the rate of the CPU's fastest kernels for that arithmetic in
the step's precision, a large matrix product and a large 3x3 convolution, measured in the same
process. A target that asks for a step faster than its arithmetic over that rate cannot be met
by any implementation of the same arithmetic with these kernels; one that asks for more than
the rate the same encoder's supervised pass reaches needs faster kernels than the CPU's
libraries have, since a step also runs batch norm and streams weights, activations and
optimizer state through memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# The ceiling's kernels: a square product (MKL or oneDNN's gemm) and a 3x3 convolution
# (oneDNN's direct kernel, channels_last), each large enough to reach its sustained rate. On the
# project's 2-core machines neither is always the faster one (on Zen 4 the convolution did
# 207-235 GFLOP/s in fp32 where the product did 158-173), so the ceiling is the better of the two.
MATMUL_SIZE = 2048
CONV_SHAPE = (32, 256, 32, 32)  # images, channels (in = out), height, width


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (multiply and add counted apart)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


Kernel = tuple[Callable[[], object], int]  # a call and its floating-point operations


def peak_kernels(
    dtype: torch.dtype,
    size: int = MATMUL_SIZE,
    conv_shape: tuple[int, int, int, int] = CONV_SHAPE,
) -> dict[str, Kernel]:
    """The ceiling's two kernels in ``dtype``, named, each with its operation count: timed
    beside a step's rows (interleaved with them), their rates move with the machine's speed
    as the rows do."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    n, c, h, w = conv_shape
    x = torch.randn(conv_shape, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=generator).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def product() -> None:
        torch.mm(a, b)

    @torch.no_grad()
    def conv() -> None:
        F.conv2d(x, weight, padding=1)

    return {"product": (product, 2 * size**3), "conv3x3": (conv, 2 * n * h * w * c * c * 9)}


def share_needed(flops: float, seconds: float, ceiling: float) -> float:
    """The share of ``ceiling`` (FLOP/s) that doing ``flops`` in ``seconds`` takes."""
    return flops / seconds / ceiling
