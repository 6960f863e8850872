"""How close a step runs to this CPU's arithmetic ceiling, and how close a target would need it.

A step's arithmetic is counted once with torch's ``FlopCounterMode`` (the matrix products and
convolutions of the forward and backward passes; elementwise work, batch norm and the optimizer
count nothing). The ceiling is the best rate of the CPU's fastest kernels for that arithmetic in
the step's precision, a large matrix product and a large 3x3 convolution, measured in the same
process. A target that asks for a step faster than its arithmetic over that rate cannot be met
by any implementation of the same arithmetic with these kernels; one that asks for more than
the rate the same encoder's supervised pass reaches needs faster kernels than the CPU's
libraries have, since a step also runs batch norm and streams weights, activations and
optimizer state through memory.
"""

from __future__ import annotations

import time
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


def _best_rate(fn: Callable[[], object], flops: float, repeats: int) -> float:
    """``flops`` over the fastest of ``repeats`` calls after two warm-ups: a ceiling is what the
    CPU did at best, and on a shared VM a median mixes in its neighbours."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / min(times)


def peak_rate(
    dtype: torch.dtype,
    repeats: int = 9,
    size: int = MATMUL_SIZE,
    conv_shape: tuple[int, int, int, int] = CONV_SHAPE,
) -> float:
    """FLOP/s of the faster of a ``size`` x ``size`` matrix product and a 3x3 convolution of
    ``conv_shape`` (channels_last) in ``dtype`` on the CPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    n, c, h, w = conv_shape
    x = torch.randn(conv_shape, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=generator).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        product = _best_rate(lambda: torch.mm(a, b), 2 * size**3, repeats)
        conv = _best_rate(
            lambda: F.conv2d(x, weight, padding=1), 2 * n * h * w * c * c * 9, repeats
        )
    return max(product, conv)


def share_needed(flops: float, seconds: float, ceiling: float) -> float:
    """The share of ``ceiling`` (FLOP/s) that doing ``flops`` in ``seconds`` takes."""
    return flops / seconds / ceiling
