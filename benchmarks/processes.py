"""The step's ratios across separate processes: ``benchmarks.step`` without its lever rows, run in
fresh processes one after another; per process its median ratios, and over the processes their
median and range.

Within one process the paired repeats spread little (a few per cent), but a peer's step moves
by 10-15 % from one process to the next on this project's shared VMs, so one process's ratio
can put a target that close on either side. The report's verdicts on the step targets take the
median over these processes when this part ran.

    python -m benchmarks.processes [--processes 4] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch

from benchmarks import peers
from benchmarks.report import header
from benchmarks.step import BOUND_TARGET, TARGETS, peer_verdict

ROWS = ("ours", "lightly", "byol-pytorch", "supervised")


@dataclass(frozen=True)
class ProcessesResult:
    """Per process, each row's median step in seconds (``ROWS``), in the order they ran."""

    runs: list[dict[str, float]]
    repeats: int

    def ratios(self, peer: str) -> list[float]:
        """Per process, ``peer``'s step over ours."""
        return [run[peer] / run["ours"] for run in self.runs]

    def bound_ratios(self) -> list[float]:
        """Per process, our step over its bound (4/3 of the supervised forward + backward)."""
        return [run["ours"] / (4 / 3 * run["supervised"]) for run in self.runs]

    def ratio(self, peer: str) -> float:
        return statistics.median(self.ratios(peer))

    def bound_ratio(self) -> float:
        return statistics.median(self.bound_ratios())

    def text(self, peer: str | None = None) -> str:
        """'2.10x (median of 4 processes, 1.98-2.20x)'; the bound's with no peer."""
        found = self.ratios(peer) if peer else self.bound_ratios()
        median = statistics.median(found)
        return (
            f"{median:.2f}x (median of {len(found)} processes, {min(found):.2f}-{max(found):.2f}x)"
        )

    def straddles(self, peer: str, target: float) -> bool:
        found = self.ratios(peer)
        return min(found) < target <= max(found)


def _child(repeats: int) -> dict[str, float]:
    from benchmarks.step import measure

    seconds = measure(repeats, levers=False).seconds
    return {row: seconds[row] for row in ROWS}


def measure(processes: int = 4, repeats: int = 5) -> ProcessesResult:
    runs = []
    for index in range(processes):
        cmd = [sys.executable, "-m", "benchmarks.processes", "--child", "--repeats", str(repeats)]
        # The children run with this process's torch threads (``--threads`` of the benchmark).
        cmd += ["--threads", str(torch.get_num_threads())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            said = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
            sys.exit(f"benchmarks.processes: process {index + 1} failed: {said[-1]}")
        run = json.loads(proc.stdout.splitlines()[-1])
        runs.append(run)
        ratios = ", ".join(f"{p} {run[p] / run['ours']:.2f}x" for p in TARGETS)
        print(
            f"process {index + 1}/{processes}: ours {run['ours'] * 1e3:.1f} ms, {ratios}",
            file=sys.stderr,
            flush=True,
        )
    return ProcessesResult(runs, repeats)


def markdown(r: ProcessesResult) -> str:
    head = " | ".join(
        [
            "process",
            *(f"{row}, ms" for row in ROWS),
            *(f"ours over {p}" for p in TARGETS),
            "ours over the bound",
        ]
    )
    lines = [f"| {head} |", "|" + "---:|" * (len(ROWS) + len(TARGETS) + 2)]
    for index, run in enumerate(r.runs):
        cells = [str(index + 1), *(f"{run[row] * 1e3:.1f}" for row in ROWS)]
        cells += [f"{run[p] / run['ours']:.2f}x" for p in TARGETS]
        cells.append(f"{r.bound_ratios()[index]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    verdicts = [
        peer_verdict(
            peer, target, r.ratio(peer), r.text(peer), r.straddles(peer, target), "processes"
        )
        for peer, target in TARGETS.items()
    ]
    met = "met" if r.bound_ratio() <= BOUND_TARGET else "**not met**"
    verdicts.append(f"- against the bound: **{r.text()}** (target <= {BOUND_TARGET}x: {met})")
    table, listed = "\n".join(lines), "\n".join(verdicts)
    return f"""### The step in separate processes

Section 1's rows without its lever rows, in {len(r.runs)} fresh processes one after another, each
with its own {r.repeats} interleaved repeats (`python -m benchmarks.processes`): a peer's step
moves by 10-15 % between processes on a shared VM, far more than between repeats in one, so the
targets table above judges the step by the median over these processes.

{table}

{listed}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1 or args.repeats < 1:
        parser.error("--processes and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(_child(args.repeats)))
        return
    for module in ("lightly", "byol_pytorch"):  # one line now, not a failed child later
        peers.require(module)
    print(header())
    print(markdown(measure(args.processes, args.repeats)))


if __name__ == "__main__":
    main()
