"""Sum all-reduce of small CPU tensors between the processes of one host, through shared memory.

Why this exists: global batch norm on CPU makes a small all-reduce per BN layer, forward and
backward (65 per step for a ResNet-18 BYOL step), each on the critical path. Through gloo each
one costs 1.8-2.1 ms inside a step on a 2-vCPU machine (loopback TCP, gloo's threads, their
wake-ups), which made global BN cost +34 % over local (docs/benchmark-distributed.md). torch's
gloo has no shared-memory transport, and oneCCL's torch bindings are not on the package index;
DeepSpeed's shared-memory all-reduce compiles a C++ extension at run time and brings a large
dependency for a few hundred bytes per call. This is the small piece that is missing: a
shared segment that every process of the group maps, with a sequence flag per process.

Protocol, for ``W`` processes and round number ``s`` (every process makes the same calls in the
same order, as with any collective; a tensor larger than a slot takes several rounds):

1. write the tensor's bytes into this process's slot of buffer ``s % 2``;
2. store ``s`` in this process's flag (the store follows the copy: x86-64 keeps stores in
   program order, which is why the transport is only offered there);
3. wait until every flag is ``>= s``;
4. sum the ``W`` slots in rank order into the tensor: every process adds the same numbers in
   the same order, so every process gets bitwise the same result.

Two buffers suffice: a process can only reach round ``s + 2`` (and overwrite buffer ``s % 2``)
after every process has posted ``s + 1``, which each does only after it finished reading ``s``.

The wait spins (yielding the CPU to the process's other threads, e.g. DDP's gloo thread) for
20 ms, then sleeps in short naps, so a process that waits long (its peer evaluating) does
not hold a core. A peer that never arrives raises after ``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Per process and buffer: batch norm's statistics for up to 8,000 channels in one round; a
# larger tensor goes through in rounds of this size.
SLOT_BYTES = 1 << 18
_FLAG_STRIDE = 8  # int64 words: one flag per 64-byte cache line, so flags do not share lines
_SPIN_SECONDS = 0.02
_NAP_SECONDS = 0.0002
# Give the CPU to any other runnable thread, and take it back at once if there is none.
yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))


class SharedMemoryAllReduce:
    """Sum all-reduce, in place, of contiguous CPU tensors between the processes of ``group``,
    all on one host. Build it with ``connect``."""

    def __init__(
        self, mapping: mmap.mmap, rank: int, world: int, slot_bytes: int, timeout: float
    ) -> None:
        self._mapping = mapping
        self.rank, self.world, self.slot_bytes, self.timeout = rank, world, slot_bytes, timeout
        flags_bytes = 8 * _FLAG_STRIDE * world
        self._flags = memoryview(mapping)[:flags_bytes].cast("q")
        data = torch.frombuffer(mapping, dtype=torch.uint8, offset=flags_bytes)
        # _slots[buffer][rank]: a byte view of that process's slot in that buffer
        self._slots = data[: 2 * world * slot_bytes].view(2, world, slot_bytes)
        self._calls = 0

    @staticmethod
    def segment_bytes(world: int, slot_bytes: int) -> int:
        return 8 * _FLAG_STRIDE * world + 2 * world * slot_bytes

    @classmethod
    def connect(
        cls,
        group: dist.ProcessGroup | None = None,
        slot_bytes: int = SLOT_BYTES,
        timeout: float = 1800.0,
        directory: str | None = None,
    ) -> SharedMemoryAllReduce | None:
        """Map one shared segment in every process of ``group`` (a collective: every process
        calls it). None, in every process alike, when any of them cannot map the segment that
        process 0 made: processes on other hosts, or in containers with their own /dev/shm,
        or a CPU that does not keep stores in order (see the module docstring).

        ``directory``: where the segment's file is made (default /dev/shm, else the temporary
        folder); it is removed as soon as every process has mapped it."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        default = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        folder = Path(directory or default)
        size = cls.segment_bytes(world, slot_bytes)
        token = secrets.token_bytes(16)
        path = folder / f"byol-bn-{secrets.token_hex(8)}"
        # The name alone: each process looks in its own /dev/shm, which in a container of its
        # own is not process 0's (the token tells a same-named file apart).
        offer = [(path.name, token) if rank == 0 else None]
        if rank == 0:
            try:
                with path.open("wb") as f:
                    f.truncate(size)
                    f.seek(size - len(token))  # the token sits in the last bytes, unused by data
                    f.write(token)
            except OSError:
                offer = [None]
        try:
            dist.broadcast_object_list(offer, group=group, group_src=0)
            mapping = cls._attach(folder, offer[0], size) if offer[0] is not None else None
            ok = torch.tensor([int(mapping is not None and _keeps_store_order())])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        finally:
            if rank == 0:
                path.unlink(missing_ok=True)  # the mappings stay valid without the name
        if not ok.item():
            if mapping is not None:
                mapping.close()
            return None
        return cls(mapping, rank, world, slot_bytes, timeout)

    @staticmethod
    def _attach(folder: Path, offer: tuple[str, bytes], size: int) -> mmap.mmap | None:
        name, token = offer
        try:
            fd = os.open(folder / name, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != size:
                return None
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if mapping[size - len(token) :] != token:  # a same-named file elsewhere
            mapping.close()
            return None
        return mapping

    @staticmethod
    def fits(tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.is_contiguous()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum a contiguous CPU ``tensor`` over the group, in place; one round of the protocol
        per ``slot_bytes`` of it."""
        if not self.fits(tensor):
            raise ValueError(
                f"shared-memory all-reduce takes contiguous CPU tensors, got "
                f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )
        if self.world == 1:
            return
        flat = tensor.view(-1)
        step = max(1, self.slot_bytes // tensor.element_size())
        for start in range(0, flat.numel(), step):
            self._round(flat[start : start + step])

    def _round(self, chunk: torch.Tensor) -> None:
        self._calls += 1
        seq = self._calls
        slots = self._slots[seq % 2]
        nbytes = chunk.numel() * chunk.element_size()
        slots[self.rank, :nbytes].copy_(chunk.view(torch.uint8))
        self._flags[self.rank * _FLAG_STRIDE] = seq
        self._wait_for(seq)
        parts = [slots[r, :nbytes].view(chunk.dtype) for r in range(self.world)]
        # In rank order, into the caller's memory: the same additions on every process.
        torch.add(parts[0], parts[1], out=chunk)
        for part in parts[2:]:
            chunk.add_(part)

    def _wait_for(self, seq: int) -> None:
        flags, stride = self._flags, _FLAG_STRIDE
        start = time.monotonic()
        while True:
            late = [r for r in range(self.world) if flags[r * stride] < seq]
            if not late:
                return
            waited = time.monotonic() - start
            if waited > self.timeout:
                raise RuntimeError(
                    f"batch norm all-reduce #{seq}: process(es) {late} of the group did not "
                    f"arrive within {self.timeout:.0f} s (did one of them fail?)"
                )
            if waited < _SPIN_SECONDS:
                yield_cpu()
            else:
                time.sleep(_NAP_SECONDS)


# One communicator per process group, made at the group's first use (every process reaches it
# at the same point, as it must for any collective); None where the group cannot use one. Keyed
# by the group object itself, which also keeps it alive.
_COMMUNICATORS: dict[object, SharedMemoryAllReduce | None] = {}


def shm_communicator(group: dist.ProcessGroup | None = None) -> SharedMemoryAllReduce | None:
    """This process's shared-memory communicator for ``group`` (the default group when None),
    or None where its processes cannot share memory. A collective on the group's first call."""
    key = dist.group.WORLD if group is None else group
    if key not in _COMMUNICATORS:
        _COMMUNICATORS[key] = SharedMemoryAllReduce.connect(group)
    return _COMMUNICATORS[key]


def _keeps_store_order() -> bool:
    # The flag protocol relies on stores becoming visible in program order (x86-TSO); on
    # weaker memory models (ARM, POWER) it would need fences that Python cannot issue.
    return platform.machine().lower() in {"x86_64", "amd64"}
