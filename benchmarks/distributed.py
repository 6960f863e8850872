"""Time a data-parallel BYOL step with 2 CPU (gloo) processes: global against local batch norm.

Global BN adds two small all-reduces per BN layer (forward and backward) on top of DDP's gradient
all-reduce; this measures what that costs. The cpu preset's model (ResNet-18 at width 16, 32 px),
global batch 256 (128 per process), one thread per process, bf16 as the trainer runs it.
Writes docs/benchmark-distributed.md.

    python -m benchmarks.distributed [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from byol_core.ema import ema_update
from byol_core.presets import resolve_spec
from byol_core.runtime import resolve_runtime
from byol_core.trainer import build, train_step

WORLD, GLOBAL_BATCH, SIZE = 2, 256, 32


def _worker(rank: int, port: int, steps: int, scopes: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    spec = resolve_spec(overrides=[f"batch_size={GLOBAL_BATCH}"])
    runtime = resolve_runtime(spec.runtime, torch.device("cpu"))
    local = GLOBAL_BATCH // WORLD
    views = [torch.randn(local, 3, SIZE, SIZE) for _ in range(2)]
    times: dict[str, list[float]] = {s: [] for s in scopes}
    models = {}
    for scope in scopes:
        model, loss_fn, opt = build(spec, runtime.device, global_bn=scope == "global")
        model.to(memory_format=torch.channels_last)
        models[scope] = (DDP(model.online), model, loss_fn, opt)
    # Interleaved so that machine noise hits both scopes alike.
    for i in range(steps + 2):
        for scope in scopes:
            online, model, loss_fn, opt = models[scope]
            dist.barrier()
            t = time.perf_counter()
            train_step(online, model.target, loss_fn, opt, views, runtime)
            ema_update(*model.target_pairs(), 0.99)
            dist.barrier()
            if i >= 2:
                times[scope].append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text("\n".join(f"{s} {statistics.median(v)}" for s, v in times.items()))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="docs/benchmark-distributed.md")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".txt") as result:
        mp.spawn(_worker, args=(port, args.steps, ["local", "global"], result.name), nprocs=WORLD)
        med = dict(
            (name, float(v))
            for name, v in (ln.split() for ln in Path(result.name).read_text().splitlines())
        )
    overhead = med["global"] / med["local"] - 1
    report = f"""# Distributed step: global against local batch norm

{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, 2 gloo processes with 1 thread each,
torch {torch.__version__}. cpu preset model (ResNet-18 width 16, 32 px), global batch
{GLOBAL_BATCH} ({GLOBAL_BATCH // WORLD} per process), DDP, bf16 autocast where available.
Median of {args.steps} interleaved steps (`python -m benchmarks.distributed`).

| BN scope | median step ms |
|---|---:|
| local (per process) | {med["local"] * 1e3:.1f} |
| global (all processes) | {med["global"] * 1e3:.1f} |

Global BN costs **{100 * overhead:+.1f}%** over local (target <= 15%).
"""
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
