"""``precision: auto`` on a CPU follows a measurement, not the instruction set, and every rank of
a data-parallel run ends up with the same choice."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from byol_core import runtime
from byol_core.spec import RuntimeSpec


def test_auto_precision_on_a_cpu_is_bf16_only_where_bf16_measures_fast():
    speedup = runtime.cpu_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0
    # Cached per thread count: a second measurement would never give the same float.
    assert runtime.cpu_bf16_speedup() == speedup
    fast = runtime.cpu_has_bf16_instructions() and speedup >= runtime.BF16_MIN_SPEEDUP
    cpu = torch.device("cpu")
    assert runtime.resolve_runtime(RuntimeSpec(precision="auto"), cpu).bf16 is fast
    # An explicit precision is taken as given, whatever the probe found.
    assert runtime.resolve_runtime(RuntimeSpec(precision="bf16"), cpu).bf16 is True
    assert runtime.resolve_runtime(RuntimeSpec(precision="fp32"), cpu).bf16 is False


def test_the_probe_runs_under_no_grad_and_inference_mode():
    with torch.no_grad():
        assert runtime._measured_bf16_speedup(-1) > 0
    with torch.inference_mode():
        assert runtime._measured_bf16_speedup(-2) > 0


def _agree(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        seen = {}
        for choices in ((True, False), (False, True), (True, True), (False, False)):
            mine = runtime.Runtime(device=cpu, bf16=choices[rank], channels_last=True)
            seen[choices] = runtime.agree_on_bf16(mine).bf16
        torch.save(seen, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_run_bf16_only_if_every_rank_chose_it(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_agree, args=(init, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen == {
            (True, False): False,
            (False, True): False,
            (True, True): True,
            (False, False): False,
        }
