"""How close a step runs to this CPU's arithmetic ceiling, and how close a target would need it.

A step's arithmetic is counted once with torch's ``FlopCounterMode`` (the matrix products and
convolutions of the forward and backward passes; elementwise work, batch norm and the optimizer
count nothing). The ceiling is the rate of one large matrix product in the step's precision,
measured in the same process: the most that oneDNN's or MKL's best kernel does on these cores.
A target that asks for a step faster than its arithmetic divided by that rate cannot be met by
any implementation of the same arithmetic; one that asks for more than ~90 % of it cannot in
practice, since a step also streams weights, activations and optimizer state through memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Large enough for MKL/oneDNN to reach their sustained rate (measured 1024 -> 4096 on the
# project's 2-core machines: 2048 within a few per cent of 4096), small enough for 50 ms a call.
MATMUL_SIZE = 2048


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (multiply and add counted apart)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(dtype: torch.dtype, repeats: int = 9, size: int = MATMUL_SIZE) -> float:
    """FLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` on the CPU, median of
    ``repeats`` calls after two warm-ups."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def share_needed(flops: float, seconds: float, ceiling: float) -> float:
    """The share of ``ceiling`` (FLOP/s) that doing ``flops`` in ``seconds`` takes."""
    return flops / seconds / ceiling
