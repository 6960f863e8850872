"""Device, precision and memory format: chosen once per run from ``RuntimeSpec``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from byol_core.spec import RuntimeSpec

_Item = TypeVar("_Item")


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions then run several times faster than fp32."""
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


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
