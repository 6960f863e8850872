"""benchmarks.distributed: the clock around batch norm's all-reduces, which also skips them for
the row that times GlobalBatchNorm's kernels alone.

The real two-process run is the benchmark itself (minutes); here only what decides each row's
meaning: a skipped collective is counted and leaves its tensor as it was, any other goes through.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.distributed import _AllReduceClock
from byol_core import sync_bn


@pytest.fixture
def doubling_collective(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """sync_bn.all_reduce replaced, for this test only, by one whose effect shows: it doubles
    the tensor (what a sum over two equal processes does) and records it."""
    seen: list[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        seen.append(tensor)
        tensor.mul_(2)

    monkeypatch.setattr(sync_bn, "all_reduce", all_reduce)
    return seen


def test_a_skipped_all_reduce_is_counted_and_changes_nothing(
    doubling_collective: list[torch.Tensor],
) -> None:
    clock = _AllReduceClock()
    stats = torch.ones(2, 5)
    clock.skip = True
    sync_bn.all_reduce(stats, None, True)
    assert clock.calls == 1
    assert torch.equal(stats, torch.ones(2, 5))
    assert doubling_collective == []


def test_without_skip_the_all_reduce_goes_through_and_is_timed(
    doubling_collective: list[torch.Tensor],
) -> None:
    clock = _AllReduceClock()
    stats = torch.ones(3)
    sync_bn.all_reduce(stats, None, True)
    clock.skip = True
    sync_bn.all_reduce(stats, None, True)
    clock.skip = False
    sync_bn.all_reduce(stats, None, True)
    assert clock.calls == 3
    assert len(doubling_collective) == 2
    assert torch.equal(stats, torch.full((3,), 4.0))
    assert clock.seconds > 0
