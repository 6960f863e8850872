"""``runtime.map_on_threads``: the pool that runs the augmentation's CPU slices (and the image
decoding) on Python threads with one torch intra-op thread each."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from byol_core.runtime import map_on_threads


def test_items_run_on_pool_threads_with_one_torch_thread_each(two_torch_threads) -> None:
    ran: dict[int, tuple[int, int]] = {}
    barrier = threading.Barrier(2, timeout=30)

    def item(i: int) -> None:
        barrier.wait()  # both items at once: they cannot share a thread
        ran[i] = (threading.get_ident(), torch.get_num_threads())

    map_on_threads(item, [0, 1], workers=2)
    assert sorted(ran) == [0, 1]
    assert len({thread for thread, _ in ran.values()}) == 2
    assert threading.get_ident() not in {thread for thread, _ in ran.values()}
    assert {count for _, count in ran.values()} == {1}
    assert torch.get_num_threads() == 2


def test_one_worker_runs_in_the_caller_with_its_threads(two_torch_threads) -> None:
    ran: list[tuple[int, int]] = []

    def item(_: int) -> None:
        ran.append((threading.get_ident(), torch.get_num_threads()))

    map_on_threads(item, [0, 1], workers=1)
    assert ran == [(threading.get_ident(), 2)] * 2


def test_a_failing_item_raises_and_restores_the_thread_count(two_torch_threads) -> None:
    def item(i: int) -> None:
        if i == 3:
            raise RuntimeError("item 3 failed")

    with pytest.raises(RuntimeError, match="item 3 failed"):
        map_on_threads(item, range(6), workers=2)
    assert torch.get_num_threads() == 2


def _map_in_child(queue) -> None:
    out: list[int] = []
    map_on_threads(out.append, range(4), workers=2)
    queue.put(sorted(out))


def test_a_forked_child_starts_its_own_pool() -> None:
    """The pool lives for the process. A child forked after the parent used it inherits the
    pool object without its threads: handed work, it would wait forever."""
    map_on_threads(lambda _: None, range(4), workers=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_map_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's pool")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [0, 1, 2, 3]
