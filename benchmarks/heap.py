"""The malloc lever: glibc keeping the memory a step frees (``runtime.keep_heap``), which the
Trainer sets in every CPU run. malloc's settings last for the process, so unlike the other
levers this one is measured across fresh processes: ours and lightly's step, each with and
without, alternating; per process the median step, and the kernel time and page faults a step.
The step table of section 1 runs every row with malloc's defaults.

    python -m benchmarks.heap [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

ROWS = ("ours", "lightly")
MODES = ("malloc's defaults", "keep_heap")


def _child(row: str, keep: bool, steps: int) -> dict[str, float]:
    from benchmarks import peers
    from benchmarks.step import augmented_views, ours_step
    from byol_core.runtime import keep_heap

    if keep and not keep_heap():
        raise SystemExit("keep_heap: not glibc")
    x0, x1 = augmented_views()
    torch.manual_seed(0)
    step = ours_step([x0, x1]) if row == "ours" else peers.lightly_step(x0, x1)
    for _ in range(3):
        step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "ms": 1e3 * statistics.median(times),
        "sys_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
        "faults": (after.ru_minflt - before.ru_minflt) / steps,
    }


def measure(steps: int = 12, rounds: int = 2) -> dict[str, float]:
    """``"keep_heap: ROW, MODE"`` -> median step ms over the rounds, with ``... kernel ms`` and
    ``... page faults`` a step beside it."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    for index in range(rounds):
        # Alternating which mode comes first, so a drift of the machine's speed splits evenly.
        modes = MODES if index % 2 == 0 else MODES[::-1]
        for row in ROWS:
            for mode in modes:
                cmd = [sys.executable, "-m", "benchmarks.heap", "--child", row, "--steps"]
                cmd += [str(steps)] + (["--keep"] if mode == "keep_heap" else [])
                cmd += ["--threads", str(torch.get_num_threads())]  # the benchmark's threads
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.setdefault((row, mode), []).append(json.loads(out.splitlines()[-1]))
    results: dict[str, float] = {}
    for (row, mode), found in runs.items():
        key = f"keep_heap: {row}, {mode}"
        results[key] = statistics.median(r["ms"] for r in found)
        results[f"{key} kernel ms"] = statistics.median(r["sys_ms"] for r in found)
        results[f"{key} page faults"] = statistics.median(r["faults"] for r in found)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args.child, args.keep, args.steps)))
        return
    for name, value in measure(args.steps, args.rounds).items():
        print(f"{name}: {value:.1f}")


if __name__ == "__main__":
    main()
