"""The shared-memory all-reduce behind global batch norm, with real processes (gloo, no mocks).

Three processes (so that the rank-order sum and the double buffering are exercised beyond a pair)
make many all-reduces of mixed sizes and dtypes back to back, with random delays so that the
processes arrive in every order; each saves what it got, and the tests compare with the exact
rank-order sum and with gloo. Separate spawns check the set-up's refusal (processes that cannot
map one segment fall back to the backend) and the timeout on a process that never arrives.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from byol_core import sync_bn
from byol_core.shm_all_reduce import SLOT_BYTES, SharedMemoryAllReduce

WORLD = 3
CALLS = 300
SHAPES = [(1,), (7,), (2, 257), (2, 8193), (3, 4, 5)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(CALLS):
        shape, dtype = SHAPES[i % len(SHAPES)], DTYPES[i % len(DTYPES)]
        out.append((torch.randn(shape, generator=g) * 10 ** (i % 7 - 3)).to(dtype))
    return out


def _init(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)


def many_calls(rank: int, init: str, out_dir: str) -> None:
    _init(rank, WORLD, init)
    try:
        folder = Path(out_dir) / "segments"
        shm = SharedMemoryAllReduce.connect(directory=str(folder))
        assert shm is not None
        dist.barrier()  # process 0 removes the file once connect's last collective is done
        left = sorted(p.name for p in folder.iterdir())
        jitter = random.Random(rank)
        got, gloo = [], []
        for x in inputs(rank):
            if jitter.random() < 0.1:  # arrive late now and then, each process at other times
                time.sleep(jitter.random() * 0.003)
            y = x.clone()
            shm.all_reduce(y)
            got.append(y)
            z = x.clone()
            dist.all_reduce(z)
            gloo.append(z)
        # Through sync_bn: a tensor too large for a slot goes through gloo, with the same sum.
        big = torch.full((SLOT_BYTES // 8 + 1,), rank + 1.0, dtype=torch.float64)
        sync_bn.all_reduce(big, None)
        torch.save(
            {"got": got, "gloo": gloo, "left": left, "big": big}, Path(out_dir) / f"{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, tmp_path: Path, *args) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(fn, args=(init, str(tmp_path), *args), nprocs=world, start_method="spawn")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("shm")
    (out / "segments").mkdir()
    mp.start_processes(
        many_calls,
        args=(f"file://{out / 'rendezvous'}", str(out)),
        nprocs=WORLD,
        start_method="spawn",
    )
    return [torch.load(out / f"{r}.pt") for r in range(WORLD)]


def test_sums_are_exact_rank_order_sums_and_identical_on_every_process(ranks):
    per_rank = [inputs(r) for r in range(WORLD)]
    for i in range(CALLS):
        expected = per_rank[0][i].clone()
        for r in range(1, WORLD):
            expected.add_(per_rank[r][i])
        for r in range(WORLD):
            got = ranks[r]["got"][i]
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected), (i, r)


def test_sums_agree_with_gloo(ranks):
    for i in range(CALLS):
        got, gloo = ranks[0]["got"][i], ranks[0]["gloo"][i]
        # gloo may add three operands in another order: equal up to rounding
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[got.dtype]
        scale = gloo.double().abs().max().item() + 1e-30
        assert (got.double() - gloo.double()).abs().max().item() <= tol * scale, i


def test_segment_file_is_removed_once_mapped(ranks):
    assert all(r["left"] == [] for r in ranks)


def test_tensor_larger_than_a_slot_goes_through_the_backend(ranks):
    for r in ranks:
        assert torch.equal(r["big"], torch.full_like(r["big"], sum(range(1, WORLD + 1))))


def separate_folders(rank: int, init: str, out_dir: str) -> None:
    # Each process looks for the segment in a folder of its own, as processes in containers
    # with their own /dev/shm do: none can map process 0's segment.
    _init(rank, 2, init)
    try:
        folder = Path(out_dir) / f"shm{rank}"
        folder.mkdir()
        shm = SharedMemoryAllReduce.connect(directory=str(folder))
        dist.barrier()
        torch.save({"none": shm is None, "left": list(folder.iterdir())}, folder / "out.pt")
    finally:
        dist.destroy_process_group()


def test_processes_that_cannot_share_a_segment_fall_back_together(tmp_path):
    spawn(separate_folders, 2, tmp_path)
    for rank in range(2):
        out = torch.load(tmp_path / f"shm{rank}" / "out.pt")
        assert out["none"], rank
        assert [p.name for p in out["left"]] == [], rank


def absent_peer(rank: int, init: str, out_dir: str) -> None:
    _init(rank, 2, init)
    try:
        shm = SharedMemoryAllReduce.connect(timeout=1.0)
        message = ""
        if rank == 0:
            started = time.monotonic()
            try:
                shm.all_reduce(torch.ones(3))
            except RuntimeError as e:
                message = f"{e} after {time.monotonic() - started:.1f}"
        dist.barrier()  # process 1 never makes the all-reduce; it waits here for process 0
        Path(out_dir, f"{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_a_process_that_never_arrives_raises_after_the_timeout(tmp_path):
    spawn(absent_peer, 2, tmp_path)
    message = (tmp_path / "0.txt").read_text()
    assert "process(es) [1]" in message and "within 1 s" in message, message
    waited = float(message.rsplit(" ", 1)[1])
    assert 1.0 <= waited < 10.0, message
