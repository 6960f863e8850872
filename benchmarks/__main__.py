"""Run every training-speed benchmark and write docs/benchmarks.md.

    python -m benchmarks [--repeats 10] [--out docs/benchmarks.md] [--skip epoch,distributed,...]

Parts: 1 the training step against the peers and our bound (with the precision / layout /
host-sync levers), then the same step without the levers in separate fresh processes, whose
median ratios the targets table judges (``benchmarks.processes``), 2 augmentation against
torchvision in a DataLoader, 3 one epoch of the CPU-scale study broken down by phase (skipped
without ../shared/data/cifar10), 4 two gloo workers, global against local batch norm
(``benchmarks.distributed`` in a subprocess, the median of three runs; its report
embedded), and the levers outside the step (optimizer, EMA, ``torch.compile`` of the step and
of the augmentation, malloc keeping its heap in fresh processes). The peers come with the
``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import augmentation, epoch, heap, levers, peers, processes, step
from benchmarks.report import hand_kept, header
from benchmarks.verdicts import levers_section, summary

PARTS = ("step", "processes", "augmentation", "epoch", "distributed", "levers", "compile")


def _distributed(steps: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "distributed.md"
        cmd = [sys.executable, "-m", "benchmarks.distributed", "--steps", str(steps)]
        subprocess.run([*cmd, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        text = out.read_text()
    # Its own report, one heading level down, under this document's numbering.
    body = text.split("\n", 1)[1].replace("\n## ", "\n### ")
    return "## 4. Distributed step: global against local batch norm\n" + body


# Sections kept by hand at the end of the document (runs compared across days, how to set up
# the peers): a new run rewrites everything before the first of them and keeps the rest.
HAND_KEPT = "## The runs compared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--data", type=Path, default=epoch.DEFAULT_DATA)
    parser.add_argument("--skip", default="", help=f"comma-separated parts of {PARTS}")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); 1 on a machine another job "
        "shares, where oversubscribed oneDNN threads spin-wait and the figures turn to noise",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    for module in ("lightly", "byol_pytorch"):  # fail before any measurement
        peers.require(module)

    started = header()
    sections: list[str] = []
    step_result = aug_result = epoch_result = processes_result = None
    lever_ms: dict[str, float] = {}

    def write() -> str:
        """The report from what has been measured so far, written after every part: a long
        part (compilation) that is stopped leaves the others' figures on disk."""
        report = "\n".join(
            [
                "# Training speed",
                "",
                f"{started} Written by `python -m benchmarks`.",
                "",
                summary(step_result, aug_result, processes_result),
                *sections,
                levers_section(step_result, lever_ms, epoch_result, aug_result),
            ]
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n" + hand_kept(args.out, HAND_KEPT))
        return report

    if "step" not in skip:
        step_result = step.measure(args.repeats)
        sections.append(step.markdown(step_result))
        write()
    if "processes" not in skip:
        processes_result = processes.measure(repeats=max(3, args.repeats // 2))
        sections.append(processes.markdown(processes_result))
        write()
    if "augmentation" not in skip:
        aug_result = augmentation.measure()
        aug_s = step_result.seconds.get("augment") if step_result else None
        ours_s = step_result.seconds["ours"] if step_result else None
        sections.append(augmentation.markdown(aug_result, ours_s, aug_s))
        write()
    if "epoch" not in skip:
        if args.data.is_dir():
            epoch_result = epoch.measure(args.data)
            sections.append(epoch.markdown(epoch_result))
        else:
            sections.append(
                f"## 3. One epoch\n\nSkipped: no CIFAR-10 ImageFolder at {args.data}.\n"
            )
        write()
    if "distributed" not in skip:
        sections.append(_distributed(steps=16))
        write()
    if "levers" not in skip:
        lever_ms.update(levers.optimizer_and_ema(args.repeats))
        lever_ms.update(levers.small_map_convs(args.repeats))
        write()
        lever_ms.update(heap.measure())
        write()
        if "compile" not in skip:
            lever_ms.update(levers.compiled_step(args.repeats))
            write()
            lever_ms.update(levers.compiled_augment(args.repeats))
    print(write())


if __name__ == "__main__":
    main()
