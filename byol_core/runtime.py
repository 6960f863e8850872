"""Device, precision and memory format: chosen once per run from ``RuntimeSpec``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from byol_core.spec import RuntimeSpec

_Item = TypeVar("_Item")


def cpu_has_bf16_instructions() -> bool:
    """AVX512-BF16 or AMX: oneDNN has native bf16 kernels (without either, bf16 is emulated)."""
    return cpu_bf16_kind() != "no bf16 instructions"


# bf16 rounds every convolution's inputs to 8 bits of mantissa: worth it only for a clear gain.
# This probe measured 0.55-0.75x on an Intel Xeon whose hypervisor hides AMX (its step: 0.77x),
# 2.2-3.1x on an AMX Xeon (step 2.1-2.3x) and 1.34-1.64x on a Zen 5 EPYC (14 processes; step
# 2.24x): the probe's small convolution understates the EPYC's gain, and at 1.2 its lowest
# reading cleared the threshold by 12 % on a noisy VM, so the threshold sits nearer the middle
# of the gap (docs/benchmarks.md, column 20).
BF16_MIN_SPEEDUP = 1.1


def cpu_bf16_speedup() -> float:
    """fp32 time over bf16-autocast time of a 3x3 convolution's forward + backward (16 images
    of 16x16, 128 channels, channels_last) on torch's current threads: about 0.2 s, once per
    process and thread count.

    Why measure: the instructions do not say how fast the kernels are. An Intel Xeon that
    reports AVX512-BF16 with AMX hidden ran the training step 1.29x slower in bf16 than in
    fp32, where a Zen 5 EPYC ran it 2.08x faster."""
    return _measured_bf16_speedup(torch.get_num_threads())


@functools.cache
def _measured_bf16_speedup(threads: int) -> float:
    del threads  # the cache key: the kernels' speed depends on it
    # Also when resolved under no_grad or inference_mode: the probe needs its backward.
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last
        conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=cl)
        x = torch.randn(16, 128, 16, 16, generator=gen).contiguous(memory_format=cl)
        x.requires_grad_()

        def once(bf16: bool) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = conv(x)
            y.float().sum().backward()
            return time.perf_counter() - start

        for bf16 in (False, True):  # oneDNN builds its kernels on the first call
            once(bf16)
        # Interleaved, the median of each: a neighbour's burst on a shared VM hits both alike.
        times = [(once(False), once(True)) for _ in range(3)]
    fp32, bf16 = (statistics.median(t) for t in zip(*times, strict=True))
    return fp32 / bf16


def cpu_has_fast_bf16() -> bool:
    """bf16 kernels in hardware that also measure clearly faster than fp32 here."""
    return cpu_has_bf16_instructions() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def cpu_bf16_kind() -> str:
    """Which bf16 hardware this CPU offers oneDNN, for reports: the speed-up of bf16 over fp32
    differs several-fold between AMX tiles, AVX512-BF16 alone and neither."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16, no AMX"
    return "no bf16 instructions"


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one intra-op thread for the duration, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_pools: dict[int, ThreadPoolExecutor] = {}


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool kept for the process: starting and joining threads per call cost 0.5 ms, a few
    per cent of a small batch's augmentation."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="byol-map")
    return _pools[workers]


# A forked child inherits the pools but not their threads: it must start its own.
os.register_at_fork(after_in_child=_pools.clear)


def map_on_threads(fn: Callable[[_Item], object], items: Iterable[_Item], workers: int) -> None:
    """``fn(item)`` for every item, spread over up to ``workers`` Python threads, each running
    torch ops on one intra-op thread; in the calling thread, as set up, for one worker or item.

    Why: ops on a few MB of memory gain little from torch's intra-op threads (each op's
    fork-join and the shared memory bandwidth eat the second core), while independent items on
    separate threads keep every core busy: torch releases the GIL inside its kernels. One
    intra-op thread each, or the two levels of threads oversubscribe the cores. Not reentrant:
    ``fn`` must not call it again (its pool's threads would wait on themselves).
    """
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    with single_threaded():
        # list() waits for every item and re-raises the first exception.
        list(_thread_pool(min(workers, len(items))).map(fn, items))


def keep_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system:
    no mmap per large block, no trimming. Whether it could (glibc only).

    Why: each step frees and reallocates the same activation blocks (several MB each); returned
    to the system, they come back as page faults on every step (measured: 16,000-34,000 a step
    for the cpu preset's network in one pass, 64-130 MB; 0-3,300 kept), at moments that differ
    between processes. Under global batch norm every process then waits at the next layer's
    collective for the one that faulted. Measured with 2 CPU processes
    (docs/benchmark-distributed.md): global BN's cost over local went from about +15-20 % to
    +6-12 %, local BN's step unchanged. In one process the faults cost the benchmark step
    about 30 ms of kernel time (15,000 a step; ``benchmarks.heap``).
    The price: the process keeps its peak heap for its lifetime, which a training process
    reaches every step anyway.
    """
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 2**31 - 1) == 1
    ok &= mallopt(m_trim_threshold, 2**31 - 1) == 1
    return ok & (mallopt(m_top_pad, 512 << 20) == 1)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast (matmuls and convolutions in bf16, reductions and the loss in fp32)."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def resolve_runtime(spec: RuntimeSpec, device: torch.device | None = None) -> Runtime:
    if device is None:
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
        use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if use_cuda else "cpu")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        bf16 = bool(fast)
    else:
        bf16 = spec.precision == "bf16"
    # channels_last measured faster for ResNets on this CPU in fp32 and bf16 (docs/benchmarks.md)
    # and is the tensor-core layout on GPUs.
    channels_last = True if spec.channels_last is None else spec.channels_last
    return Runtime(device=device, bf16=bf16, channels_last=channels_last)


def agree_on_bf16(runtime: Runtime) -> Runtime:
    """bf16 only if every process of the initialised process group chose it: each measured its
    own CPU (``cpu_bf16_speedup``), the hosts of a cluster may differ, and a near tie could fall
    either way, while data-parallel ranks must run the same arithmetic."""
    flag = torch.tensor([int(runtime.bf16)], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return replace(runtime, bf16=bool(flag.item()))
